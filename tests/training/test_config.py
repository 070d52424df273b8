"""Job configs: every example validates; mistakes are errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from expertmesh.training.config import (
    JOB_CONFIGS,
    PretrainConfig,
    SFTConfig,
    TrainingConfigError,
    load_config,
    parse_config,
)
from expertmesh.training.demo import DemoPipelineConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "training"
JOB_OF = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "distill": "distill",
          "quantize": "quantize", "prune": "prune"}  # fmt: skip


def _minimal() -> dict:
    return {
        "model": {"preset": "demo"},
        "run": {"name": "r"},
        "output": {"dir": "out"},
    }


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path: Path):
    if path.stem == "demo":
        cfg = parse_config(yaml.safe_load(path.read_text()), DemoPipelineConfig)
        parse_config(cfg.pretrain, PretrainConfig)
        assert cfg.sft is not None  # its model.checkpoint is the pre-training output, set later
        parse_config({**cfg.sft, "model": {"checkpoint": "runs/demo/pretrain"}}, SFTConfig)
        return
    kind = path.stem.split("-")[0]
    assert kind in JOB_CONFIGS, f"{path.name} should start with a job name"
    load_config(path, JOB_CONFIGS[kind])


def test_bad_value_names_the_field():
    data = _minimal() | {"optim": {"lr": -1}}
    with pytest.raises(TrainingConfigError, match=r"optim\.lr: .*greater than 0"):
        parse_config(data, PretrainConfig)


def test_unknown_field_is_an_error_not_ignored():
    data = _minimal() | {"optim": {"learning_rate": 0.1}}
    with pytest.raises(TrainingConfigError, match=r"optim\.learning_rate: Extra inputs"):
        parse_config(data, PretrainConfig)


def test_model_needs_exactly_one_source():
    data = _minimal() | {"model": {"checkpoint": "x", "preset": "demo"}}
    with pytest.raises(TrainingConfigError, match="cannot be combined"):
        parse_config(data, PretrainConfig)


def test_missing_section_is_named():
    data = {"model": {"preset": "demo"}, "output": {"dir": "o"}}
    with pytest.raises(TrainingConfigError, match=r"\n  run: Field required"):
        parse_config(data, PretrainConfig)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(TrainingConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", PretrainConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(TrainingConfigError, match="not valid YAML"):
        load_config(bad, PretrainConfig)
