"""`expertmesh job submit|status|logs` against a local Ray head's Job Submission API."""

from __future__ import annotations

import socket
import sys
import time

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


@pytest.mark.e2e
def test_submit_status_and_logs_against_a_local_ray_head(tmp_path, capsys):
    import ray
    from ray.job_submission import JobSubmissionClient

    port = _free_port()
    address = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_port=port)
    try:
        client = JobSubmissionClient(address)
        deadline = time.monotonic() + 120
        while True:  # the head's job agent comes up a few seconds after ray.init returns
            try:
                client.submit_job(entrypoint="true")
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        missing = tmp_path / "missing.yaml"
        argv = ["job", "submit", "quantize", "--config", str(missing), "--address", address]
        argv += ["--python", sys.executable, "--submission-id", "em-test-1", "--wait"]
        assert main([*argv, "--timeout", "120"]) == 1, "a job whose config is missing fails"
        out = capsys.readouterr().out
        assert out.startswith("submitted em-test-1\n")
        assert f"ray job submit -- {sys.executable} -m expertmesh.training.quantize" in out
        assert "missing.yaml" in out, "the job's logs are printed"
        assert out.rstrip().endswith("em-test-1: FAILED")

        assert main(["job", "status", "em-test-1", "--address", address]) == 0
        status = capsys.readouterr().out
        assert status.startswith("em-test-1: FAILED")
        assert "expertmesh.training.quantize" in status

        assert main(["job", "logs", "em-test-1", "--address", address]) == 0
        assert "missing.yaml" in capsys.readouterr().out
        assert main(["job", "logs", "em-test-1", "--address", address, "--follow"]) == 0
        assert "missing.yaml" in capsys.readouterr().out
    finally:
        ray.shutdown()
