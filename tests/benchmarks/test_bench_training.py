"""`benchmarks/bench_training.example_job` runs the example DPO and distillation configs as
`expertmesh train` would, but from any working directory and into a given folder: every path
resolves against the repository, Ray storage and outputs go under the folder, and `--steps`
shortens a run without leaving a checkpoint or evaluation step beyond its end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_training

from expertmesh.training.config import DistillConfig, DPOConfig, parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("kind", "cls"), [("dpo", DPOConfig), ("distill", DistillConfig)])
def test_example_job_resolves_paths_and_keeps_the_example_settings(
    kind, cls, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative paths would now point nowhere
    cfg = parse_config(bench_training.example_job(kind, tmp_path, None), cls, kind)
    raw = bench_training.yaml.safe_load((REPO / f"examples/training/{kind}.yaml").read_text())
    assert cfg.optim.max_steps == raw["optim"]["max_steps"]
    assert cfg.run.num_workers == raw["run"]["num_workers"]
    assert Path(cfg.run.storage_path).is_relative_to(tmp_path)
    assert Path(cfg.output.dir).is_relative_to(tmp_path)
    assert not cfg.run.progress_bar
    if kind == "dpo":
        paths = [cfg.model.checkpoint, cfg.data.train, cfg.data.val]
    else:
        paths = [cfg.model.tokenizer, cfg.distill.teacher]
        assert cfg.distill.baseline  # the hard-labels student the bench compares against
    for p in paths:
        assert p is not None and Path(p).is_absolute() and Path(p).exists(), p


@pytest.mark.parametrize("kind", ["dpo", "distill"])
def test_steps_override_shortens_the_run_and_its_schedule(kind, tmp_path):
    job = bench_training.example_job(kind, tmp_path, 7)
    assert job["optim"]["max_steps"] == 7
    assert job["optim"]["warmup_steps"] <= 7
    assert job["run"]["checkpoint_every"] <= 7
    assert job["run"]["eval_every"] <= 7
