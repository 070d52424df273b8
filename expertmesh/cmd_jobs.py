"""`expertmesh job submit|status|logs`: our training and compression pipelines as Ray jobs,
through Ray's Job Submission API (the dashboard address of any Ray cluster).

    expertmesh job submit sft --config examples/training/sft.yaml --address http://127.0.0.1:8265
    expertmesh job status JOB_ID
    expertmesh job logs JOB_ID --follow

`submit` runs `python -m expertmesh.training.<pipeline> --config FILE` as the job's entrypoint,
the same as `ray job submit -- python -m expertmesh.training.<pipeline> --config FILE` (it prints
that equivalent). The address comes from `--address`, else `$RAY_ADDRESS`, else the local
dashboard; with Ray token auth on, the client reads the token from `$RAY_AUTH_TOKEN`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobClientError(RuntimeError):
    """The Ray cluster could not be reached or refused the request."""


def add_jobs(sub: argparse._SubParsersAction) -> None:
    from expertmesh.training.entry import JOBS

    p = sub.add_parser("job", help="submit pipelines as Ray jobs and follow them")
    jsub = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")

    submit = jsub.add_parser(
        "submit",
        help="submit a training or compression pipeline",
        description="Submit `python -m expertmesh.training.PIPELINE --config FILE` as a Ray job.",
    )
    submit.add_argument("pipeline", choices=JOBS, help="which pipeline")
    submit.add_argument(
        "--config", required=True, help="job config, a path as the job sees it (examples/training/)"
    )
    _address(submit)
    submit.add_argument(
        "--working-dir",
        default=None,
        help="upload this directory as the job's working directory (default: the cluster's own)",
    )
    submit.add_argument("--submission-id", default=None, help="job id to use (default: Ray's)")
    submit.add_argument(
        "--python", default="python", help="Python interpreter on the cluster (default python)"
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait for the end, print the logs; exit 1 unless it succeeded",
    )
    submit.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)"
    )
    submit.set_defaults(func=run_submit)

    status = jsub.add_parser("status", help="a job's status")
    status.add_argument("job_id")
    _address(status)
    status.set_defaults(func=run_status)

    logs = jsub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    _address(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(func=run_logs)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help=f"Ray dashboard address (default $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )


def entrypoint(pipeline: str, config: str, python: str = "python") -> str:
    """The job's shell command."""
    return shlex.join([python, "-m", f"expertmesh.training.{pipeline}", "--config", config])


def _client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    resolved = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(resolved)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobClientError(f"cannot reach the Ray dashboard at {resolved}: {e}") from e


def _client_errors() -> tuple[type[Exception], ...]:
    """What a call to the cluster may raise that deserves one line, not a traceback: cannot
    connect, a refusal, or a missing/wrong Ray token (`ray.exceptions.AuthenticationError`)."""
    from ray.exceptions import AuthenticationError

    return (JobClientError, ConnectionError, RuntimeError, ValueError, AuthenticationError)


def _fail(args: argparse.Namespace, error: Exception) -> int:
    print(f"expertmesh job {args.job_command}: error: {error}", file=sys.stderr)
    return 2


def run_submit(args: argparse.Namespace) -> int:
    command = entrypoint(args.pipeline, args.config, args.python)
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    try:
        client = _client(args.address)
        job_id = _submit(client, command, runtime_env, args.submission_id)
    except _client_errors() as e:
        return _fail(args, e)
    working_dir = f" --working-dir {shlex.quote(args.working_dir)}" if args.working_dir else ""
    print(f"submitted {job_id}")
    print(f"  follow: expertmesh job logs {job_id} --follow")
    print(f"  ray equivalent: ray job submit{working_dir} -- {command}")
    if not args.wait:
        return 0
    status = _wait(client, job_id, args.timeout)
    print(client.get_job_logs(job_id), end="")
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


AGENT_WAIT_S = 60.0
"""How long `submit` retries while the head's job agent is not up yet (it starts seconds after
the head, and the API answers "No available agent to submit job" until then)."""


def _submit(client: Any, command: str, runtime_env: Any, submission_id: str | None) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(
                client.submit_job(
                    entrypoint=command, runtime_env=runtime_env, submission_id=submission_id
                )
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _wait(client: Any, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id).value)
    return status


def run_status(args: argparse.Namespace) -> int:
    try:
        info = _client(args.address).get_job_info(args.job_id)
    except _client_errors() as e:
        return _fail(args, e)
    print(f"{args.job_id}: {info.status.value}")
    print(f"  entrypoint: {info.entrypoint}")
    if info.message:
        print(f"  message: {info.message}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    try:
        client = _client(args.address)
        if not args.follow:
            print(client.get_job_logs(args.job_id), end="")
            return 0

        async def follow() -> None:
            async for chunk in client.tail_job_logs(args.job_id):
                print(chunk, end="", flush=True)

        asyncio.run(follow())
    except _client_errors() as e:
        return _fail(args, e)
    return 0
