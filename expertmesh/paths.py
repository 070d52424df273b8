"""Where bundled assets live, and how model arguments on the command line resolve to paths."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo"
"""The bundled demo checkpoint (config.json, model.safetensors, tokenizer files)."""


def resolve_model(arg: str) -> Path:
    """'demo' names the bundled demo model; anything else is a checkpoint directory."""
    return DEMO_MODEL_DIR if arg == "demo" else Path(arg).expanduser()
