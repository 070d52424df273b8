"""The bundled demo model: its shape, and the one command that trains it.

    nice -n 19 python -m expertmesh.training.demo --config examples/training/demo.yaml

(about 35 minutes on 2 CPU cores). Three Ray Train jobs, then a check:

1. pre-training on the Shakespeare training plays (`training/pretrain.py`), data-parallel;
2. a short supervised fine-tune on the example chat data (`training/sft.py`), so a chat
   request such as the main job's "ROMEO:" is answered with a speech that ends at `<|end|>`;
3. a text-to-SQL fine-tune (`sql_sft`, the same SFT pipeline) on question/SQL pairs over the
   sample database (`agents/sql_demo.py --sft-data` writes them, with the service's exact
   prompts), rehearsing the chat data (`data.replay`) so stage 2 is kept;
4. export to `expertmesh/demo` in bf16, measure validation perplexity on the held-out plays
   through the engine's KV-cache path (`models/evaluate.py`), generate a few samples, and write
   the model card `expertmesh/demo/README.md`.

Rerunning with the same run names resumes from the last checkpoints (delete
`runs/ray/demo-*` to train from scratch).

The demo model is DeepSeek-V3-shaped (multi-head latent attention, sigmoid router with a
score-correction bias, group-limited routing, a shared expert, one leading dense layer), so the
main job exercises every part of the model core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class DemoPipelineConfig(BaseModel):
    """examples/training/demo.yaml: the two jobs and what to check afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pretrain: dict[str, Any]
    """A pretrain job config (see `training/config.py: PretrainConfig`)."""
    sft: dict[str, Any] | None = None
    """An SFT job config; its model.checkpoint is set to the pre-training output."""
    sql_sft: dict[str, Any] | None = None
    """A second SFT job (text-to-SQL); its model.checkpoint is set to the previous output."""
    out: str = "expertmesh/demo"
    """Where the demo checkpoint goes (bf16)."""
    eval_windows: int = 64
    samples: list[str] = ["ROMEO:", "To be, or not to be,"]
    chat_samples: list[str] = ["ROMEO:", "Give me a line about love."]


def _samples(out: Path, prompts: Sequence[str], chat: Sequence[str]) -> dict[str, str]:
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    gen = Generator(load_model(out), tok)
    params = SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=0)
    texts = [*prompts, *(tok.apply_chat_template([{"role": "user", "content": c}]) for c in chat)]
    labels = [*prompts, *(f"[chat] {c}" for c in chat)]
    done = gen.generate([tok.encode(t, add_special_tokens=True) for t in texts], params)
    return {label: c.text for label, c in zip(labels, done)}


def _model_card(out: Path, report: dict[str, Any]) -> None:
    samples = "\n\n".join(
        f"**{prompt}**\n\n```\n{text.strip()}\n```" for prompt, text in report["samples"].items()
    )
    (out / "README.md").write_text(
        f"""# expertmesh demo model

A {report["parameters"] / 1e6:.1f}M-parameter DeepSeek-V3-shaped MoE (4 layers, 8 routed
experts top-2 + 1 shared, MLA), trained on this machine by
`python -m expertmesh.training.demo --config examples/training/demo.yaml`:
pre-training on the Shakespeare plays ({report["pretrain_steps"]} steps, {report["pretrain_tokens"] / 1e6:.1f}M tokens),
then a short SFT on `examples/training/data/sft_train.jsonl`, then a text-to-SQL SFT on
`examples/training/data/sql_train.jsonl` (question/SQL pairs over `examples/sql/shakespeare.sqlite`;
held-out execution accuracy: `benchmarks/bench_sql.py`, recorded in `benchmarks/RESULTS.md`).

- Validation perplexity on the held-out plays ({", ".join(report["val_plays"])}),
  {report["eval_tokens"]} tokens through the KV cache: **{report["val_perplexity"]:.1f}**
  (after pre-training alone: {report["pretrain_val_perplexity"]:.1f}).
- Tokenizer: byte-level BPE, 4096 tokens, trained on the training plays.

Data credit: the texts are from the `shakespeare` 0.6 package (Project Gutenberg editions),
licensed CC-BY 2.5 by the Open Knowledge Foundation.

## Samples (temperature 0.8, top-p 0.95, seed 0)

{samples}
""",
        encoding="utf-8",
    )


def run_demo(cfg: DemoPipelineConfig) -> dict[str, Any]:
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.evaluate import perplexity

    from .config import PretrainConfig, SFTConfig, parse_config
    from .data import corpus_files
    from .pretrain import prepare_lm_data, run_pretrain
    from .runner import export_checkpoint
    from .sft import run_sft

    out = Path(cfg.out)
    pre_cfg = parse_config(cfg.pretrain, PretrainConfig, "pretrain")
    pre = run_pretrain(pre_cfg)
    if not pre.finished or pre.output_dir is None:
        raise RuntimeError(f"pre-training stopped at {pre.metrics.get('step')}; rerun to resume")
    final = pre
    sft_metrics: dict[str, Any] = {}
    for stage, raw in (("sft", cfg.sft), ("sql_sft", cfg.sql_sft)):
        if raw is None:
            continue
        start = {**raw.get("model", {}), "checkpoint": str(final.output_dir)}
        final = run_sft(parse_config({**raw, "model": start}, SFTConfig, stage))
        if not final.finished or final.checkpoint is None or final.output_dir is None:
            raise RuntimeError(f"{stage} stopped at {final.metrics.get('step')}; rerun to resume")
        sft_metrics[f"{stage}_val_answer_perplexity"] = final.metrics.get("val_answer_perplexity")
    assert final.checkpoint is not None
    export_checkpoint(final.checkpoint, out, "bfloat16")

    from expertmesh.models.tokenizer import Tokenizer

    data = prepare_lm_data(pre_cfg.data, Tokenizer.from_dir(out), out)
    model = load_model(out)
    windows = data.val_windows[: cfg.eval_windows]
    # Every window holds the same number of targets: the overall perplexity is the geometric
    # mean of the windows' perplexities.
    log_ppl = [math.log(perplexity(model, w.tolist(), window=w.numel() - 1)) for w in windows]
    ppl = math.exp(sum(log_ppl) / len(log_ppl))
    _, val_files = corpus_files(
        pre_cfg.data.corpus, pre_cfg.data.files, pre_cfg.data.cache_dir, pre_cfg.data.val_fraction
    )
    report = {
        "val_perplexity": ppl,
        "pretrain_val_perplexity": pre.metrics.get("val_perplexity"),
        **sft_metrics,
        "eval_tokens": int(windows[:, 1:].numel()),
        "val_plays": [p.stem.removesuffix("_gut") for p in val_files],
        "pretrain_steps": pre_cfg.optim.max_steps,
        "pretrain_tokens": pre_cfg.optim.max_steps
        * pre_cfg.data.batch_size
        * pre_cfg.data.seq_len
        * max(1, pre_cfg.run.num_workers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": _samples(out, cfg.samples, cfg.chat_samples),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _model_card(out, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from .config import TrainingConfigError, parse_config
    from .entry import expected_errors

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("examples/training/demo.yaml"))
    args = parser.parse_args(argv)
    try:
        if not args.config.is_file():
            raise TrainingConfigError(f"config file {args.config} does not exist")
        cfg = parse_config(
            yaml.safe_load(args.config.read_text()), DemoPipelineConfig, str(args.config)
        )
        report = run_demo(cfg)
    except expected_errors() as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
