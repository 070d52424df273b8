"""Request classification and model selection (not built yet)."""
