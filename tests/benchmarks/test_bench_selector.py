"""The LiteLLM baseline of `benchmarks/bench_selector.py` runs on the same 50 models and its
region filter really filters. Needs the optional `bench` extra (litellm); `make test` does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_selector

litellm = pytest.importorskip(
    "litellm",
    reason="litellm is not installed: it is the optional `bench` extra (pip install -e '.[bench]')",
)


def test_litellm_rows_cover_the_three_setups_and_keep_residency() -> None:
    data = bench_selector.build_policy_data()
    rows, note = bench_selector.litellm_baseline(data, bench_selector.build_requests(50), n=40)
    assert [r["setup"] for r in rows] == [
        "simple-shuffle (random pick, no filter)",
        "cost-based-routing + region tags",
        "cost-based-routing + region tags + pre-call checks",
    ], note
    for row in rows:
        assert row["n"] == 40 and 0 < row["p50_us"] <= row["p99_us"]
    assert all(r["off_region_picks"] == 0 for r in rows[1:])


def test_litellm_deployments_are_the_same_catalogue_with_free_models_cheapest() -> None:
    data = bench_selector.build_policy_data()
    deployments = bench_selector.litellm_deployments(data)
    assert [d["model_info"]["id"] for d in deployments] == [m["name"] for m in data["models"]]
    costs = {
        d["model_info"]["id"]: d["litellm_params"]["input_cost_per_token"] for d in deployments
    }
    free = [m["name"] for m in data["models"] if m["input_usd_per_1m"] == 0]
    assert free and all(0 < costs[n] < min(c for c in costs.values() if c > 1e-9) for n in free)
