"""Fixtures for the training tests: a tiny corpus, a tiny demo-shaped checkpoint, local Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from expertmesh.models.checkpoint import save_model
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.training.config import ModelSection
from expertmesh.training.model_init import fresh_config, start_model

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
"""The demo model's family and routing (DeepSeek-V3, 8 experts top-2, 2 groups), tiny sizes."""

VERSE = """ROMEO.
But soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief.

JULIET.
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

"""


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "verse.txt"
    path.write_text(VERSE * 60, encoding="utf-8")
    return path


TINY_MODEL: dict[str, Any] = {
    "preset": "demo",
    "config": TINY_SHAPE,
    "tokenizer": str(DEMO_MODEL_DIR),
}


@pytest.fixture(scope="session")
def tiny_model() -> dict[str, Any]:
    """The `model:` section of a job config for a fresh tiny demo-shaped model."""
    return {**TINY_MODEL, "config": dict(TINY_SHAPE)}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny demo-shaped checkpoint with the demo tokenizer."""
    section = ModelSection.model_validate(TINY_MODEL)
    raw = fresh_config(section, Tokenizer.from_dir(DEMO_MODEL_DIR))
    out = tmp_path_factory.mktemp("tiny-ckpt")
    return save_model(start_model(section, raw), out, tokenizer_from=DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private Ray instance with 2 CPUs for this module's Ray Train runs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
