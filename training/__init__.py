"""Training and compression pipelines on Ray Train (not built yet)."""
