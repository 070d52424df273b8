"""Expert pruning and merging from recorded routing statistics.

    expertmesh train prune --config examples/training/prune.yaml
    python -m expertmesh.training.prune --config examples/training/prune.yaml

1. Record routing on calibration text from the training split (`models.router_stats.RouterStats`:
   token-to-expert assignments per layer).
2. For r in `experts_removed`, in every MoE layer remove the r least-used experts:
   - `prune`: drop them (their router rows too); tokens route among the survivors. Usage-based
     expert dropping as studied by Lu et al., "Not All Experts are Equal: Efficient Expert
     Pruning and Skipping for Mixture-of-Experts LLMs" (ACL 2024), with frequency as the
     criterion.
   - `merge`: fold each removed expert into the surviving expert whose router row is most
     similar (cosine), averaging their weights by usage, as in Li et al., "Merge, Then Compress:
     Demystify Efficient SMoE with Hints from Its Routing Policy" (ICLR 2024, MC-SMoE). The
     survivor keeps its router row, so it now also serves its merged partner's tokens.
3. Save each as a normal checkpoint (`n_routed_experts` smaller in config.json), reload it with
   `models.checkpoint.load_model`, and measure held-out perplexity.

Group-limited routing (DeepSeek's `n_group` / `topk_group`) needs equal groups, which removal
by usage does not keep, so reduced checkpoints route over all survivors (`n_group: 1`).

Outputs in `output.dir`: `prune-<r>/`, `merge-<r>/`, `curve.png` (perplexity vs experts removed),
`curve.md` (the same as a table) and `report.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import load_model, save_model
from expertmesh.models.model import MoEModel
from expertmesh.models.router_stats import RouterStats

from .compression import eval_data, expert_bytes
from .config import PruneConfig
from .entry import JobError, job_main
from .evaluation import window_perplexity

Method = Literal["prune", "merge"]
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")


@torch.no_grad()
def record_routing(model: MoEModel, windows: torch.Tensor, batch: int = 8) -> RouterStats:
    """Token-to-expert counts of `model` over (n, T) token windows."""
    stats = RouterStats(model.config)
    for s in range(0, windows.shape[0], batch):
        model(windows[s : s + batch], router_stats=stats)
    return stats


def experts_to_keep(counts: torch.Tensor, remove: int) -> list[int]:
    """Ids of the experts that survive removing the `remove` least-used (ties: higher id goes)."""
    order = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    return sorted(order[: len(counts) - remove])


def merge_partner(router_weight: torch.Tensor, removed: int, keep: Sequence[int]) -> int:
    """The kept expert whose router row is most similar (cosine) to the removed one's."""
    rows = torch.nn.functional.normalize(router_weight.float(), dim=-1)
    sims = rows[list(keep)] @ rows[removed]
    return keep[int(sims.argmax())]


def _reduced_raw(raw: dict, n_experts: int) -> dict:
    out = dict(raw)
    key = next((k for k in EXPERT_COUNT_KEYS if k in out), None)
    if key is None:
        raise JobError(f"config.json names its expert count with none of {EXPERT_COUNT_KEYS}")
    if out[key] == n_experts:
        return out
    out[key] = n_experts
    if "n_group" in out:
        out["n_group"] = 1
        out["topk_group"] = 1
    return out


def reduce_experts(model: MoEModel, stats: RouterStats, remove: int, method: Method) -> MoEModel:
    """A copy of `model` with `remove` fewer routed experts in every MoE layer."""
    cfg = model.config
    n = cfg.moe.num_experts - remove
    if n < cfg.moe.top_k:
        raise JobError(
            f"experts_removed: removing {remove} of {cfg.moe.num_experts} experts leaves fewer "
            f"than top-k ({cfg.moe.top_k})"
        )
    raw = _reduced_raw(cfg.raw, n)
    new_cfg = adapter_for(raw).parse_config(raw)
    with torch.device("meta"):
        reduced = MoEModel(new_cfg)
    reduced = reduced.to_empty(device="cpu").to(model.dtype)
    if new_cfg.tie_embeddings:
        reduced.lm_head.weight = reduced.embed.weight
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in reduced.named_parameters():
            if ".moe.router." not in name and ".experts." not in name:
                param.copy_(source[name])
        for src, dst in zip(model.blocks, reduced.blocks):
            if src.moe is None or dst.moe is None:
                continue
            counts = stats.tokens[src.layer]
            keep = experts_to_keep(counts, remove)
            router, bank = src.moe.router, src.moe.experts
            gate_up = bank.gate_up.detach().clone()
            down = bank.down.detach().clone()
            if method == "merge":
                # Usage-weighted average into the most similar survivor (+1: unseen experts count a little).
                weight = counts.double() + 1.0
                acc_gu = {k: gate_up[k] * weight[k] for k in keep}
                acc_dn = {k: down[k] * weight[k] for k in keep}
                total = {k: weight[k].clone() for k in keep}
                for e in sorted(set(range(len(counts))) - set(keep)):
                    k = merge_partner(router.weight, e, keep)
                    acc_gu[k] += gate_up[e] * weight[e]
                    acc_dn[k] += down[e] * weight[e]
                    total[k] += weight[e]
                for k in keep:
                    gate_up[k] = acc_gu[k] / total[k]
                    down[k] = acc_dn[k] / total[k]
            dst.moe.router.weight.copy_(router.weight[keep])
            if router.score_bias is not None and dst.moe.router.score_bias is not None:
                dst.moe.router.score_bias.copy_(router.score_bias[keep])
            dst.moe.experts.gate_up.copy_(gate_up[keep])
            dst.moe.experts.down.copy_(down[keep])
    if new_cfg.moe.router_in_fp32:
        for block in reduced.blocks:
            if block.moe is not None:
                block.moe.router.float()
    return reduced.eval()


@dataclass(frozen=True)
class CurvePoint:
    method: str
    experts_removed: int
    experts_left: int
    expert_bytes: int
    perplexity: float
    checkpoint: str


@dataclass(frozen=True)
class PruneOutcome:
    output_dir: Path
    baseline_perplexity: float
    points: list[CurvePoint]
    plot: Path
    table: Path


def plot_curve(points: Sequence[CurvePoint], baseline: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in sorted({p.method for p in points}):
        pts = sorted((p for p in points if p.method == method), key=lambda p: p.experts_removed)
        ax.plot(
            [p.experts_removed for p in pts], [p.perplexity for p in pts], marker="o", label=method
        )
    ax.axhline(baseline, color="grey", linestyle=":", label="unpruned")
    ax.set_xlabel("routed experts removed per MoE layer")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Expert pruning / merging by routing statistics")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_table(points: Sequence[CurvePoint], baseline: float) -> str:
    removed = sorted({p.experts_removed for p in points})
    methods = sorted({p.method for p in points})
    by = {(p.method, p.experts_removed): p for p in points}
    lines = [
        "| experts removed per layer | experts left | "
        + " | ".join(f"{m} perplexity (x unpruned)" for m in methods)
        + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in removed:
        left = next(p.experts_left for p in points if p.experts_removed == r)
        cells = []
        for m in methods:
            p = by.get((m, r))
            cells.append(f"{p.perplexity:.2f} ({p.perplexity / baseline:.2f})" if p else "-")
        lines.append(f"| {r} | {left} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_prune(job: PruneConfig) -> PruneOutcome:
    source = Path(job.model).resolve()
    out = Path(job.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(source, dtype="float32")
    data = eval_data(source, job.eval)
    T = job.eval.seq_len
    n_cal = max(1, job.calibration_tokens // T)
    starts = torch.linspace(0, len(data.train) - T - 1, n_cal).long().tolist()
    calibration = torch.stack(
        [torch.from_numpy(data.train[s : s + T].astype("int64")) for s in starts]
    )
    stats = record_routing(model, calibration)
    (out / "routing_stats.json").write_text(json.dumps(stats.to_dict()) + "\n")

    baseline = window_perplexity(model, data.val_windows)
    points = []
    for method in job.methods:
        for r in job.experts_removed:
            target = out / f"{method}-{r}"
            save_model(reduce_experts(model, stats, r, method), target, tokenizer_from=source)
            reloaded = load_model(target, dtype="float32")  # what the engine serves
            points.append(
                CurvePoint(
                    method,
                    r,
                    reloaded.config.moe.num_experts,
                    expert_bytes(reloaded),
                    window_perplexity(reloaded, data.val_windows),
                    str(target),
                )
            )
    plot = plot_curve(points, baseline, out / "curve.png")
    table = out / "curve.md"
    table.write_text(curve_table(points, baseline))
    outcome = PruneOutcome(out, baseline, points, plot, table)
    report = {
        "model": str(source),
        "baseline_perplexity": baseline,
        "points": [p.__dict__ for p in points],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("prune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
