"""`benchmarks/bench_placement.py`'s peer: vLLM's shipped EPLB, run in `.venv-vllm`, gets the
same inputs as `cluster/eplb.py` and is judged by EPLB's own objective (the most loaded GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_placement

from expertmesh.cluster.eplb import rebalance_experts


def test_gpu_max_load_is_the_busiest_gpu_per_layer_with_replicas_sharing_tokens() -> None:
    load = np.array([[6.0, 2.0, 1.0, 1.0]])
    # 2 GPUs x 3 slots; expert 0 has two replicas (3 tokens each).
    phy2log = np.array([[0, 2, 3, 0, 1, 1]])
    # GPU 0: 3 + 1 + 1 = 5; GPU 1: 3 + 1 + 1 = 5 (expert 1's two replicas take 1 each).
    assert bench_placement.gpu_max_load(phy2log, load, 2) == pytest.approx(5.0)
    lopsided = np.array([[0, 0, 1, 2, 3, 3]])
    assert bench_placement.gpu_max_load(lopsided, load, 2) == pytest.approx(8.0)


def test_without_vllm_the_peer_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_placement, "VLLM_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    why = bench_placement.vllm_eplb_times([(np.ones((1, 4)), 4, 1, 1, 2)], repeats=1)
    assert isinstance(why, str) and "make venv-vllm" in why


@pytest.mark.vllm
@pytest.mark.skipif(
    not bench_placement.VLLM_PYTHON.exists(),
    reason=f"{bench_placement.VLLM_PYTHON} is missing: `make test-vllm` builds it",
)
def test_vllm_eplb_balances_as_well_as_ours_on_the_same_inputs() -> None:
    rng = np.random.default_rng(3)
    load = rng.lognormal(0.0, 0.8, (4, 16)) * 100
    cases = [(load, 24, 4, 2, 8), (load, 32, 1, 1, 4)]  # hierarchical, then global
    got = bench_placement.vllm_eplb_times(cases, repeats=2)
    assert not isinstance(got, str), got
    for (weight, slots, groups, nodes, gpus), (ms, phy2log) in zip(cases, got):
        ours = rebalance_experts(weight, slots, groups, nodes, gpus).phy2log
        assert ms > 0 and phy2log.shape == ours.shape == (4, slots)
        assert (np.sort(np.unique(phy2log)) == np.arange(16)).all()  # every expert placed
        assert bench_placement.gpu_max_load(phy2log, weight, gpus) == pytest.approx(
            bench_placement.gpu_max_load(ours, weight, gpus), rel=1e-9
        )
