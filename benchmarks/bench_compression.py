"""int8 experts and expert pruning/merging of the demo model, against the float model in the
same run, with the figures kept as JSON.

    .venv/bin/python benchmarks/bench_compression.py     # JSON: benchmarks/results/bench_compression.json

Runs the two compression jobs exactly as `expertmesh train quantize|prune --config
examples/training/{quantize,prune}.yaml` do (the same configs; outputs to a temporary folder
instead of runs/): the quantize job measures memory, held-out perplexity and generation
tokens/s of the int8-expert model against the float model; the prune job records routing on
training text and scores a pruned and a merged checkpoint per number of experts removed
against the unpruned model. Both baselines are measured in the same run.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

from expertmesh.training.config import PruneConfig, QuantizeConfig, parse_config
from expertmesh.training.prune import run_prune
from expertmesh.training.quantize import run_quantize

EXAMPLES = REPO_ROOT / "examples" / "training"


def job(name: str, cls: type, out: Path) -> Any:
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["model"] = str(REPO_ROOT / data["model"])
    data["output"]["dir"] = str(out / name)
    return parse_config(data, cls, name)


def main() -> None:
    console = make_console()
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        console.print("[bold]quantize[/]: int8 routed experts vs float")
        q = run_quantize(job("quantize", QuantizeConfig, Path(tmp)))
        console.print("[bold]prune[/]: pruned and merged checkpoints vs the unpruned model")
        p = run_prune(job("prune", PruneConfig, Path(tmp)))
    quantize = dataclasses.asdict(q)
    quantize.pop("output_dir")
    prune = {
        "baseline_perplexity": p.baseline_perplexity,
        "points": [
            {k: v for k, v in dataclasses.asdict(pt).items() if k != "checkpoint"}
            for pt in p.points
        ],
    }
    print_table(
        "int8 routed experts vs float (same run)",
        ["", "float", "int8 experts", "int8 / float"],
        [
            ["routed-expert bytes", q.float_expert_bytes, q.int8_expert_bytes,
             q.int8_expert_bytes / q.float_expert_bytes],
            ["parameter bytes", q.float_param_bytes, q.int8_param_bytes,
             q.int8_param_bytes / q.float_param_bytes],
            ["checkpoint bytes", q.float_checkpoint_bytes, q.int8_checkpoint_bytes,
             q.int8_checkpoint_bytes / q.float_checkpoint_bytes],
            ["perplexity", q.float_perplexity, q.int8_perplexity, 1 + q.perplexity_change],
            *[
                [f"tokens/s, {b}", s["float"], s["int8"], s["int8"] / s["float"]]
                for b, s in q.tokens_per_s.items()
            ],
        ],
        console,
    )  # fmt: skip
    print_table(
        "Experts removed per layer: perplexity (x unpruned, same run)",
        ["method", "removed", "experts left", "perplexity", "x unpruned"],
        [
            [
                pt.method,
                pt.experts_removed,
                pt.experts_left,
                pt.perplexity,
                pt.perplexity / p.baseline_perplexity,
            ]
            for pt in p.points
        ],
        console,
    )
    path = write_result(
        "bench_compression",
        {"quantize": quantize, "prune": prune},
        baseline="the float demo model (quantize) and the unpruned demo model (prune), "
        "measured in the same run",
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
