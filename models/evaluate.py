"""Perplexity of a model on a token stream, through a chosen KV-cache mode.

Tokens are fed in chunks through the cache, so every attention read goes through the mode
being measured (int8 or latent caches are lossy or restructured; a single cache-less forward
would not see them). The stream is cut into windows of `window` tokens, each scored from an
empty cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import KVMode
from .device import model_device
from .kv_cache import KVCache
from .model import MoEModel


@torch.inference_mode()
def perplexity(
    model: MoEModel,
    token_ids: Sequence[int],
    kv_mode: KVMode | None = None,
    window: int = 256,
    chunk: int = 32,
    max_windows: int | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) over `token_ids`."""
    mode = model.config.check_kv_mode(kv_mode or model.config.default_kv_mode)
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    n_windows = max(1, (len(ids) - 1) // window)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    nll, count = 0.0, 0
    for w in range(n_windows):
        seq = ids[w * window : (w + 1) * window + 1]
        if len(seq) < 2:
            break
        inputs, targets = seq[:-1][None], seq[1:]
        cache = KVCache(model.config, mode, 1, inputs.shape[1], model.dtype, model_device(model))
        logits = torch.cat(
            [model(inputs[:, s : s + chunk], cache) for s in range(0, inputs.shape[1], chunk)],
            dim=1,
        )[0]
        nll += F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum").item()
        count += len(targets)
    return math.exp(nll / max(count, 1))
