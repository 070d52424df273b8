"""The vLLM side of `bench_engine.py`: vLLM's offline engine (`vllm.LLM`) in its own venv,
driven over stdin/stdout so its timed calls interleave with the other engines' in one run.

    .venv-vllm/bin/python benchmarks/vllm_peer.py --checkpoint DIR [--max-num-seqs 32]

`bench_engine.py` starts this itself (the main venv has no vLLM: `make venv-vllm` builds
.venv-vllm). Protocol, one JSON object per line: the parent writes
`{"prompts": [[ids...], ...], "max_tokens": 64}` (or `{"quit": true}`) to stdin; this process
answers on stdout with a line `@@vllm {"time_s": ..., "token_ids": [[...], ...]}`, the wall
time of one `LLM.generate` call over all prompts (greedy, EOS ignored, no detokenisation: the
other engines return token ids too). Other stdout lines are vLLM's logs; the parent skips them.
It answers `@@vllm {"ready": true, "load_s": ..., ...}` once the engine is loaded.

Prefix caching is off: the timed calls repeat the same prompts, and our engine has no prefix
cache, so with it vLLM would skip prefill on every repeat. vLLM spawns its engine core and
worker processes: hence the `__main__` guard. Thread binding (`VLLM_CPU_OMP_THREADS_BIND`) and
the KV cache size (`VLLM_CPU_KVCACHE_SPACE`) come from the environment the parent sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

MARK = "@@vllm "


def answer(payload: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a transformers-format checkpoint dir")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="vLLM's batch slots")
    parser.add_argument("--max-model-len", type=int, default=512, help="vLLM's context window")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.checkpoint,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
        seed=0,
    )
    answer(
        {
            "ready": True,
            "load_s": time.perf_counter() - t0,
            "vllm": vllm.__version__,
            "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        params = SamplingParams(
            max_tokens=int(request["max_tokens"]),
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        answer({"time_s": elapsed, "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
