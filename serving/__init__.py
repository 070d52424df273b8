"""OpenAI-compatible serving on Ray Serve (not built yet)."""
