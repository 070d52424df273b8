"""The compact wire: formats, their error against fp32, and the binary frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.cluster import wire
from expertmesh.cluster.wire import Packed, ShardRequest, pack, unpack


def _rows(n: int = 16, hidden: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g) * torch.logspace(-2, 1, n)[:, None]


def test_fp32_wire_is_exact():
    x = _rows()
    assert torch.equal(unpack(pack(x, "fp32"), torch.float32), x)


def test_bf16_wire_is_exact_for_bf16_activations_and_halves_the_bytes():
    x = _rows().to(torch.bfloat16)
    p = pack(x, "bf16")
    assert torch.equal(unpack(p, torch.bfloat16), x)
    assert p.nbytes == pack(x, "fp32").nbytes // 2


@pytest.mark.parametrize(("fmt", "max_rel"), [("bf16", 2**-8), ("fp8", 2**-3), ("int8", 1 / 127)])
def test_lossy_formats_stay_within_their_rounding_error_per_row(fmt, max_rel):
    x = _rows()
    err = (unpack(pack(x, fmt), torch.float32) - x).abs().amax(dim=1)
    scale = x.abs().amax(dim=1)
    # Per-row scaling: the error is relative to each row's own magnitude, small rows included.
    assert bool((err <= max_rel * scale * 1.01).all()), (err / scale).max()
    assert bool((err > 0).any())  # lossy for fp32 inputs, as documented


def test_zero_rows_and_empty_blocks_round_trip():
    for fmt in wire.WIRE_FORMATS:
        z = torch.zeros(3, 8)
        assert torch.equal(unpack(pack(z, fmt), torch.float32), z)
        e = pack(torch.zeros(0, 8), fmt)
        assert unpack(e, torch.float32).shape == (0, 8)


def test_unknown_wire_format_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"wire: unknown format 'fp16'.*bf16"):
        wire.check_wire("fp16")


def test_auto_wire_is_bf16_only_for_bf16_models():
    assert wire.wire_for("auto", torch.bfloat16) == "bf16"
    assert wire.wire_for("auto", torch.float32) == "fp32"
    assert wire.wire_for("int8", torch.float32) == "int8"


@pytest.mark.parametrize("fmt", wire.WIRE_FORMATS)
def test_request_frame_round_trips(fmt):
    req = ShardRequest(
        3, pack(_rows(5, 32), fmt), np.array([0, 4, 4, 2], np.int32), np.array([1, 1, 6, 7])
    )
    frame = b"".join(bytes(b) for b in wire.frame_request(req, {"traceparent": "00-ab"}))
    got, trace = wire.read_request(frame[wire.LENGTH.size :])
    assert trace == {"traceparent": "00-ab"}
    assert (got.layer, got.rows.fmt, got.echo) == (3, fmt, False)
    np.testing.assert_array_equal(got.rows.data, req.rows.data)
    np.testing.assert_array_equal(got.row_of, req.row_of)
    np.testing.assert_array_equal(got.experts, req.experts)
    (size,) = wire.LENGTH.unpack(frame[: wire.LENGTH.size])
    assert size == len(frame) - wire.LENGTH.size


def test_reply_frames_carry_outputs_timings_or_the_error():
    out = pack(_rows(4, 16), "int8")
    frame = b"".join(bytes(b) for b in wire.frame_reply(out, (0.5, 0.25, 0.125)))
    status, got, timings, error = wire.read_reply(frame[wire.LENGTH.size :])
    assert (status, timings, error) == (wire.OK, (0.5, 0.25, 0.125), None)
    assert isinstance(got, Packed)
    np.testing.assert_array_equal(got.scales, out.scales)
    bad = wire.frame_reply(None, status=wire.EXPERT_NOT_LOADED, error={"layer": 1, "experts": [2]})
    status, got, _, error = wire.read_reply(b"".join(bytes(b) for b in bad)[wire.LENGTH.size :])
    assert (status, got, error) == (wire.EXPERT_NOT_LOADED, None, {"layer": 1, "experts": [2]})


def test_foreign_or_truncated_frames_are_refused():
    req = ShardRequest(1, pack(_rows(2, 8), "bf16"), np.array([0, 1], np.int32), np.array([0, 1]))
    frame = b"".join(bytes(b) for b in wire.frame_request(req))[wire.LENGTH.size :]
    with pytest.raises(wire.FrameError, match="truncated"):
        wire.read_request(frame[:-3])
    with pytest.raises(wire.FrameError, match="not an expertmesh request"):
        wire.read_request(b"XXXX" + frame[4:])
    with pytest.raises(wire.FrameError, match="shorter than its header"):
        wire.read_reply(b"EMW1")
