"""`expertmesh job submit|status|logs` against a local Ray head's Job Submission API."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from expertmesh.cli import build_parser, main
from expertmesh.cmd_jobs import entrypoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_entrypoint_is_the_pipeline_module_with_its_config():
    assert (
        entrypoint("sft", "examples/training/sft.yaml")
        == "python -m expertmesh.training.sft --config examples/training/sft.yaml"
    )
    assert entrypoint("dpo", "my config.yaml", "/opt/py") == (
        "/opt/py -m expertmesh.training.dpo --config 'my config.yaml'"
    )


def test_every_pipeline_is_a_choice_of_submit():
    parser = build_parser()
    for pipeline in ("pretrain", "sft", "dpo", "distill", "quantize", "prune"):
        args = parser.parse_args(["job", "submit", pipeline, "--config", "c.yaml"])
        assert args.pipeline == pipeline
    with pytest.raises(SystemExit):
        parser.parse_args(["job", "submit", "finetune", "--config", "c.yaml"])


def test_unreachable_cluster_is_one_clear_error(capsys):
    address = f"http://127.0.0.1:{_free_port()}"
    assert main(["job", "status", "some-job", "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertmesh job status: error:")
    assert "127.0.0.1" in err


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh process: Ray reads the token-auth settings once per process."""
    return subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def ray_head(local_ray_head):
    """A Ray head of our own with token auth (1 CPU); see tests/conftest.py."""
    with local_ray_head(1, "emray") as head:
        yield head


@pytest.mark.e2e
@pytest.mark.slow
def test_submit_status_and_logs_against_a_local_ray_head(ray_head, tmp_path):
    address, env = ray_head
    missing = tmp_path / "missing.yaml"
    argv = ["job", "submit", "quantize", "--config", str(missing), "--address", address]
    argv += ["--python", sys.executable, "--submission-id", "em-test-1", "--wait"]
    run = _cli(env, *argv, "--timeout", "240")
    assert run.returncode == 1, f"a job whose config is missing fails: {run.stderr[-2000:]}"
    assert run.stdout.startswith("submitted em-test-1\n")
    assert f"ray job submit -- {sys.executable} -m expertmesh.training.quantize" in run.stdout
    assert "missing.yaml" in run.stdout, "the job's logs are printed"
    assert run.stdout.rstrip().endswith("em-test-1: FAILED")

    run = _cli(env, "job", "status", "em-test-1", "--address", address)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("em-test-1: FAILED")
    assert "expertmesh.training.quantize" in run.stdout

    run = _cli(env, "job", "logs", "em-test-1", "--address", address)
    assert run.returncode == 0 and "missing.yaml" in run.stdout
    run = _cli(env, "job", "logs", "em-test-1", "--address", address, "--follow")
    assert run.returncode == 0 and "missing.yaml" in run.stdout

    no_token = {**env, "RAY_AUTH_TOKEN": "wrong"}
    run = _cli(no_token, "job", "status", "em-test-1", "--address", address)
    assert run.returncode == 2 and "expertmesh job status: error:" in run.stderr
