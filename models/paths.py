"""Where checkpoints are found: the bundled demo checkpoint and `model` arguments.

    resolve_model("demo")          # the bundled demo checkpoint directory
    resolve_model("~/ckpt/olmoe")  # any other argument is a checkpoint directory

The demo checkpoint ships as package data of the `expertmesh` distribution (next to the CLI,
`expertmesh/demo/`); finding it is the model core's concern, so every package that loads a
model asks here rather than the CLI.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_MODEL_DIR = Path(str(files("expertmesh").joinpath("demo")))
"""The bundled demo checkpoint (config.json, model.safetensors, tokenizer files)."""


def resolve_model(arg: str) -> Path:
    """'demo' names the bundled demo model; anything else is a checkpoint directory."""
    return DEMO_MODEL_DIR if arg == "demo" else Path(arg).expanduser()
