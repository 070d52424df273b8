"""A small catalog and tenants every routing test builds its policy from."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from expertmesh.policies import Policy, hash_api_key, parse_policy

EU_KEY = "sk-test-eu-0123456789abcdef"
GLOBAL_KEY = "sk-test-global-0123456789abcdef"


def model(name: str, inp: float, out: float, ctx: int, caps: list[str], regions: list[str],
          tier: str, ttft_ms: float, tps: float) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "engine": "expertmesh" if inp == 0 and out == 0 else "openai",
        "input_usd_per_1m": inp,
        "output_usd_per_1m": out,
        "context_window": ctx,
        "capabilities": caps,
        "regions": regions,
        "safety_tier": tier,
        "latency": {"ttft_ms": ttft_ms, "tokens_per_s": tps},
    }


BASE: dict[str, Any] = {
    "version": 1,
    "name": "test",
    "defaults": {"objective": "cheapest", "max_tokens": 100},
    "models": [
        model("local-free", 0, 0, 4096, ["chat"], ["local"], "standard", 100, 20),
        model("eu-cheap", 0.1, 0.2, 32000, ["chat", "json", "tools"], ["eu"], "standard", 200, 100),
        model("eu-strict", 1, 2, 128000, ["chat", "tools", "json", "code", "sql"], ["eu"], "strict", 300, 50),
        model("us-fast", 0.5, 1, 128000, ["chat", "tools", "json", "code"], ["us"], "permissive", 100, 200),
        model("us-big", 3, 15, 200000, ["chat", "tools", "json", "code", "sql"], ["us"], "strict", 500, 60),
    ],
    "tenants": [
        {"name": "eu-corp", "api_key_hashes": [hash_api_key(EU_KEY)], "regions": ["eu", "local"]},
        {"name": "global", "api_key_hashes": [hash_api_key(GLOBAL_KEY)], "regions": ["eu", "us", "local"]},
    ],
}  # fmt: skip


def policy_dict(**overrides: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(overrides))
    return data


@pytest.fixture
def make_policy() -> Callable[..., Policy]:
    """make_policy(rules=[...], fallbacks={...}, tenants=[...], ...) -> Policy over BASE."""

    def build(**overrides: Any) -> Policy:
        return parse_policy(policy_dict(**overrides))

    return build


@pytest.fixture
def policy_data() -> Callable[..., dict[str, Any]]:
    """policy_data(**overrides) -> a fresh policy dict over BASE (to edit before parsing)."""
    return policy_dict


@pytest.fixture
def api_keys() -> dict[str, str]:
    """Tenant name -> plaintext key whose hash BASE stores."""
    return {"eu-corp": EU_KEY, "global": GLOBAL_KEY}
