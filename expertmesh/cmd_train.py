"""`expertmesh train JOB --config FILE`: the training and compression jobs of `training/`.

    expertmesh train pretrain --config examples/training/pretrain-tiny.yaml
    expertmesh train sft|dpo|distill|quantize|prune --config examples/training/<job>.yaml

The same jobs run on a Ray cluster with
`ray job submit --working-dir . -- python -m expertmesh.training.<job> --config FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_train(sub: argparse._SubParsersAction) -> None:
    from expertmesh.training.entry import JOBS

    p = sub.add_parser(
        "train",
        help="pre-train, fine-tune, distil, quantise or prune a model on Ray Train",
        description="Run a training or compression job from a YAML config (examples/training/).",
    )
    p.add_argument("job", choices=JOBS, help="which job")
    p.add_argument("--config", required=True, type=Path, help="job config (YAML)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from expertmesh.training.entry import expected_errors, run_job

    try:
        result = run_job(args.job, args.config)
    except expected_errors() as e:  # one line, exit 2, like the other commands
        print(f"expertmesh train {args.job}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
