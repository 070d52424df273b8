"""A minimal valid policy, as plain data, for schema and check tests to break one field at a time."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

MINIMAL: dict[str, Any] = {
    "version": 1,
    "name": "p",
    "models": [
        {
            "name": "local",
            "engine": "expertmesh",
            "input_usd_per_1m": 0,
            "output_usd_per_1m": 0,
            "context_window": 2048,
            "capabilities": ["chat"],
            "regions": ["local"],
            "safety_tier": "standard",
            "latency": {"ttft_ms": 100, "tokens_per_s": 20},
        },
        {
            "name": "eu-api",
            "engine": "openai",
            "endpoint": "https://eu.example/v1",
            "input_usd_per_1m": 0.15,
            "output_usd_per_1m": 0.6,
            "context_window": 128000,
            "capabilities": ["chat", "tools"],
            "regions": ["eu"],
            "safety_tier": "strict",
            "latency": {"ttft_ms": 200, "tokens_per_s": 80},
        },
    ],
    "tenants": [
        {"name": "a", "regions": ["local", "eu"]},
        {"name": "b", "regions": ["eu"]},
    ],
}


@pytest.fixture
def policy_data() -> Callable[..., dict[str, Any]]:
    """policy_data(**overrides) -> a fresh copy of MINIMAL with top-level keys replaced."""

    def build(**overrides: Any) -> dict[str, Any]:
        data = copy.deepcopy(MINIMAL)
        data.update(copy.deepcopy(overrides))
        return data

    return build
