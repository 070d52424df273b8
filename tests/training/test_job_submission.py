"""A tiny pre-training job submitted to a local Ray head exactly as the docs say,
`ray job submit --working-dir DIR -- python -m expertmesh.training.pretrain --config FILE`,
then followed through `ray.job_submission.JobSubmissionClient` until it succeeds. The job runs
two data-parallel workers (DDP over gloo) and exports a checkpoint the model core loads."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """Our own Ray head (`ray start --head --block`, 2 CPUs). Every port is chosen free: other
    Ray instances on the machine would otherwise collide with the fixed default ports of the
    dashboard agent. Stopped by ending its process group, never `ray stop` (which would stop
    every Ray on the machine). Yields (dashboard address, client environment with its token)."""
    temp_dir = tempfile.mkdtemp(prefix="emtrain", dir="/tmp")  # short: Ray's socket paths
    dashboard_port = _free_port()
    ports = [
        "--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
        "--object-manager-port", "--ray-client-server-port",
    ]  # fmt: skip
    argv = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp_dir]
    argv += [
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--disable-usage-stats",
    ]
    argv += [f"--dashboard-port={dashboard_port}", *(f"{p}={_free_port()}" for p in ports)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    probe = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "C(sys.argv[1]).submit_job(entrypoint='true')"
    )
    try:
        deadline = time.monotonic() + 300
        # The dashboard, then the job agent, come up seconds after the head.
        while subprocess.run([sys.executable, "-c", probe, address], env=env).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the Ray head's job agent did not come up")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


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
