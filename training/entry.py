"""Command-line entry points shared by every job: `python -m expertmesh.training.<job>` and
`expertmesh train <job>` both land in `run_job`.

Each job module exposes `run_<job>(config)`, returning an outcome whose `summary()` (or, for
training runs, metrics) is printed as JSON at the end, so `ray job logs` shows the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import JOB_CONFIGS, TrainingConfigError, load_config

JOBS = tuple(JOB_CONFIGS)
"""pretrain, sft, dpo, distill, quantize, prune."""


class JobError(RuntimeError):
    """A job could not run with this config (bad input data, unusable model); named in the text."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix; the CLI prints them as one line and exits 2."""
    from expertmesh.models.errors import ModelError
    from expertmesh.models.tokenizer import TokenizerError

    from .corpus import CorpusError
    from .data import DatasetError

    return (
        TrainingConfigError,
        DatasetError,
        CorpusError,
        JobError,
        ModelError,
        TokenizerError,
        FileNotFoundError,
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run_job(kind: str, config_path: str | Path) -> dict[str, Any]:
    """Load and validate the config, run the job, return its JSON-ready outcome."""
    if kind not in JOB_CONFIGS:
        raise TrainingConfigError(f"unknown job '{kind}'; use one of {', '.join(JOBS)}")
    config = load_config(config_path, JOB_CONFIGS[kind])
    module = importlib.import_module(f"expertmesh.training.{kind}")
    outcome = getattr(module, f"run_{kind}")(config)
    return dict(_jsonable(outcome))


def job_main(kind: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m expertmesh.training.{kind}",
        description=f"Run the {kind} job described by a YAML config.",
    )
    parser.add_argument("--config", required=True, type=Path, help="job config (YAML)")
    args = parser.parse_args(argv)
    try:
        result = run_job(kind, args.config)
    except expected_errors() as e:
        print(f"{kind}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
