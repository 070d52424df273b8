"""int8 weight-only quantisation of the routed experts, with per-output-channel scales.

    expertmesh train quantize --config examples/training/quantize.yaml
    python -m expertmesh.training.quantize --config examples/training/quantize.yaml

Each expert projection W (out, in) becomes int8 q and a float scale s (out,) with
s = max|W[row]| / 127 and q = round(W / s) (symmetric, per channel: the scheme of
LLM.int8()'s weight side and of gpt-fast's int8 weight-only mode). The routed experts hold
most of an MoE's parameters, so this is where the bytes are; attention, the shared expert,
embeddings and routers stay float. The output is a normal checkpoint: config.json gains
`quantization_config: {quant_method: expertmesh_int8_experts}` and `models/checkpoint.py`
builds int8 `ExpertBank`s for it, which multiply with PyTorch's int8 weight-only kernel.

The job reports expert and total weight bytes, checkpoint size, generation tokens/s (greedy,
the engine's `Generator`, interleaved repeats) and held-out perplexity, float vs int8.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import (
    INT8_EXPERTS,
    load_model,
    parse_config,
    resolve_dtype,
    save_model,
)
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.model import MoEModel

from .compression import checkpoint_bytes, eval_data, expert_bytes, param_bytes
from .config import QuantizeConfig
from .entry import job_main
from .evaluation import window_perplexity


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, float32 scale) with weight ~= q * scale[..., None]; rows are output channels."""
    amax = weight.detach().abs().amax(dim=-1).float()
    scale = (amax / 127.0).clamp_min(1e-12)
    q = torch.round(weight.detach().float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_experts(model: MoEModel) -> MoEModel:
    """A copy of `model` whose routed experts are int8 (everything else unchanged)."""
    raw = dict(model.config.raw)
    raw["quantization_config"] = {
        "quant_method": INT8_EXPERTS,
        "bits": 8,
        "scheme": "symmetric per output channel",
        "modules": "routed experts",
    }
    config = parse_config(raw, adapter_for(raw))
    with torch.device("meta"):
        qmodel = MoEModel(config)
    qmodel = qmodel.to_empty(device="cpu").to(model.dtype)
    if config.tie_embeddings:
        qmodel.lm_head.weight = qmodel.embed.weight
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in qmodel.named_parameters():
            if ".experts." not in name:
                param.copy_(source[name])
        for src, dst in zip(model.blocks, qmodel.blocks):
            if src.moe is None or dst.moe is None:
                continue
            bank, qbank = src.moe.experts, dst.moe.experts
            assert qbank.gate_up_scale is not None and qbank.down_scale is not None
            for weight, qweight, scale in (
                (bank.gate_up, qbank.gate_up, qbank.gate_up_scale),
                (bank.down, qbank.down, qbank.down_scale),
            ):
                q, s = quantize_per_channel(weight)
                qweight.copy_(q)
                scale.copy_(s)
    if config.moe.router_in_fp32:
        for block in qmodel.blocks:
            if block.moe is not None:
                block.moe.router.float()
    return qmodel.eval()


def generation_tokens_per_s(
    models: dict[str, MoEModel], prompt_tokens: int, new_tokens: int, batch: int, repeats: int
) -> dict[str, float]:
    """Greedy generation tokens/s of each model (median of `repeats`, models interleaved)."""
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompts = [
        torch.randint(5, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(batch)
    ]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    generators = {name: Generator(m) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for g in generators.values():  # warm-up
        g.generate(prompts, params)
    for _ in range(repeats):
        for name, g in generators.items():
            t0 = time.perf_counter()
            g.generate(prompts, params)
            times[name].append(time.perf_counter() - t0)
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


@dataclass(frozen=True)
class QuantizeOutcome:
    output_dir: Path
    float_expert_bytes: int
    int8_expert_bytes: int
    float_param_bytes: int
    int8_param_bytes: int
    float_checkpoint_bytes: int
    int8_checkpoint_bytes: int
    float_perplexity: float
    int8_perplexity: float
    perplexity_change: float
    """int8 / float - 1."""
    tokens_per_s: dict[str, dict[str, float]]
    """{"batch N": {"float": tok/s, "int8": tok/s}}"""


def run_quantize(job: QuantizeConfig) -> QuantizeOutcome:
    source = Path(job.model).resolve()
    # Quantise from fp32 and measure in fp32 (the engine's default); store the float tensors
    # that stay float in output.dtype.
    model = load_model(source, dtype="float32")
    stored = quantize_experts(model).to(resolve_dtype(job.output.dtype))
    out = save_model(stored, job.output.dir, tokenizer_from=source)
    qmodel = load_model(out, dtype="float32")  # what the engine will load

    windows = eval_data(source, job.eval).val_windows
    ppl_f = window_perplexity(model, windows)
    ppl_q = window_perplexity(qmodel, windows)
    speeds: dict[str, dict[str, float]] = {}
    for batch in job.bench_batch_sizes:
        speeds[f"batch {batch}"] = generation_tokens_per_s(
            {"float": model, "int8": qmodel},
            job.bench_prompt_tokens,
            job.bench_new_tokens,
            batch,
            job.bench_repeats,
        )
    outcome = QuantizeOutcome(
        output_dir=out,
        float_expert_bytes=expert_bytes(model),
        int8_expert_bytes=expert_bytes(qmodel),
        float_param_bytes=param_bytes(model),
        int8_param_bytes=param_bytes(qmodel),
        float_checkpoint_bytes=checkpoint_bytes(source),
        int8_checkpoint_bytes=checkpoint_bytes(out),
        float_perplexity=ppl_f,
        int8_perplexity=ppl_q,
        perplexity_change=ppl_q / ppl_f - 1,
        tokens_per_s=speeds,
    )
    _write_report(out, outcome)
    return outcome


def _write_report(out: Path, outcome: QuantizeOutcome) -> None:
    import dataclasses
    import json

    report: dict[str, Any] = dataclasses.asdict(outcome)
    report["output_dir"] = str(outcome.output_dir)
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("quantize", argv)


if __name__ == "__main__":
    raise SystemExit(main())
