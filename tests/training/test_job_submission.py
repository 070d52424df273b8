"""A tiny pre-training job submitted to a local Ray head exactly as the docs say,
`ray job submit --working-dir DIR -- python -m expertmesh.training.pretrain --config FILE`,
then followed through `ray.job_submission.JobSubmissionClient` until it succeeds. The job runs
two data-parallel workers (DDP over gloo) and exports a checkpoint the model core loads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from expertmesh.models.checkpoint import load_model

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_head(local_ray_head):
    """A Ray head of our own with token auth (2 CPUs); see tests/conftest.py."""
    with local_ray_head(2, "emtrain") as head:
        yield head


WAIT = """
import sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[3])
status = client.get_job_status(sys.argv[2])
while not status.is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
    status = client.get_job_status(sys.argv[2])
print(client.get_job_logs(sys.argv[2]))
print("STATUS", status.value)
"""


def test_pretrain_job_submitted_to_a_ray_head_succeeds(ray_head, tmp_path, corpus_file, tiny_model):
    address, env = ray_head
    work = tmp_path / "work"  # the job's --working-dir, uploaded to the head by `ray job submit`
    work.mkdir()
    out = tmp_path / "model"
    config = {
        "model": tiny_model,
        "data": {"files": [str(corpus_file)], "seq_len": 32, "batch_size": 4, "val_windows": 4},
        "optim": {"max_steps": 4, "warmup_steps": 1},
        "run": {
            "name": "submitted",
            "storage_path": str(tmp_path / "ray"),
            "num_workers": 2,
            "checkpoint_every": 4,
            "eval_every": 4,
            "progress_bar": False,
        },
        "output": {"dir": str(out)},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(work)]
    submit += ["--submission-id", "tiny-pretrain", "--no-wait", "--"]
    submit += [sys.executable, "-m", "expertmesh.training.pretrain", "--config", "tiny.yaml"]
    deadline = time.monotonic() + 60
    while True:  # the head's job agent can drop out for a moment on a loaded machine
        run = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
        transient = "No available agent" in run.stdout + run.stderr
        if run.returncode == 0 or not transient or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    wait = [sys.executable, "-c", WAIT, address, "tiny-pretrain", "400"]
    done = subprocess.run(wait, env=env, capture_output=True, text=True, timeout=460)
    assert done.stdout.rstrip().endswith("STATUS SUCCEEDED"), done.stdout[-4000:]
    assert '"finished": true' in done.stdout
    assert (
        "world_size=2" in done.stdout
        or "Wrapping provided model in DistributedDataParallel" in done.stdout
    )
    assert load_model(out).config.model_type == "deepseek_v3"
