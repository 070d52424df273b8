"""The primitives every block of the decoder uses: the GEMM shapes CPUs like (`linear`,
`skinny_mm`), int8 weights, activations and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_kernel

SKINNY_ROWS = 128
"""At or below this many input rows, `linear` computes (W @ x^T)^T instead of x @ W^T.

Measured on the project's CPU (AMD EPYC, AVX2, PyTorch 2.13 with MKL): for 2-64 rows and
weights not in cache, MKL's GEMM with the weight as the left operand runs about 2x faster
(decode and per-expert token groups are this shape); above ~128 rows the two are equal.
See benchmarks/RESULTS.md.
"""


def skinny_mm(weight: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """weight (out, in) @ xt (in, n) for a few columns n, laid out token-major (xt = x.t()).

    One column is computed as two: MKL's matrix-vector path for n = 1 measured about 2x
    slower here than its n = 2 GEMM (the weight is read once either way; benchmarks/RESULTS.md),
    so the column is duplicated and one copy of the result kept."""
    if xt.shape[1] != 1 or xt.device.type != "cpu":
        return torch.mm(weight, xt)
    pair = xt.t().expand(2, xt.shape[0]).contiguous().t()  # (in, 2), token-major
    return torch.mm(weight, pair)[:, :1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the weight-on-the-left GEMM for skinny inputs (see SKINNY_ROWS)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 0 or rows > SKINNY_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if (
        rows <= decode_kernel.FEW_ROWS
        and (rows >= 8 or weight.shape[0] <= 2048)
        and decode_kernel.linear_applies(x, weight)
    ):
        out = decode_kernel.few_rows_linear(x.reshape(rows, x.shape[-1]), weight)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])
    out = skinny_mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (n, in) @ (weight * scale[:, None])^T for an int8 weight (out, in), float scale (out,).

    For a single row on CPU this is PyTorch's weight-only int8 kernel (`_weight_int8pack_mm`,
    the one gpt-fast uses). Otherwise the weight is dequantised and multiplied in x's dtype:
    on the project's AVX2 CPU that kernel costs about 35 us per row for a 384 x 256 weight
    (2.3 ms at 64 rows) against 30-90 us for dequantise + GEMM (benchmarks/RESULTS.md).
    """
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == scale.dtype:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale)
    return linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])


class Linear(nn.Linear):
    """nn.Linear that uses `linear` (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_kernel.rms_norm_applies(x, self.weight):  # fp32 inference: one pass a row
            return decode_kernel.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, scale in the input dtype (as the reference implementations do).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
