"""Fixtures of the GPU tests: the CPU fp32 reference each GPU run is compared with."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 parity needs fp32 GEMMs: TF32 (10-bit mantissa) would be a bf16-sized error."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
