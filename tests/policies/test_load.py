"""load_policy / parse_policy: valid files build a Policy; every bad field is named with a fix."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertmesh.policies import (
    PolicyError,
    hash_api_key,
    load_policy,
    parse_policy,
    policy_from_text,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "policies").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_load(path):
    policy = load_policy(path)
    assert policy.models and policy.tenants
    assert len(policy.version) == 64


def test_default_policy_serves_the_demo_model_for_the_documented_dev_key():
    policy = load_policy(Path(__file__).resolve().parents[2] / "examples/policies/default.yaml")
    demo = policy.model("expertmesh-demo")
    assert demo.engine == "expertmesh" and demo.free
    dev = policy.tenant("dev")
    assert dev is not None and hash_api_key("sk-expertmesh-dev") in dev.key_hashes


def test_prices_become_exact_integers(policy_data):
    data = policy_data()
    data["models"][1]["input_usd_per_1m"] = 0.0375
    m = parse_policy(data).model("eu-api")
    assert m.input_price_pico == 37_500  # USD/1M * 10**6 = pico-USD per token
    assert m.cost_micro_usd(1_000_000, 0) == 37_500  # $0.0375 for 1M input tokens


def test_version_hash_ignores_key_order_and_comments(policy_data):
    data = policy_data()
    text = yaml.safe_dump(data, sort_keys=True)
    other = "# a comment\n" + yaml.safe_dump(dict(reversed(list(data.items()))), sort_keys=False)
    assert policy_from_text(text).version == policy_from_text(other).version
    data["models"][0]["context_window"] = 4096
    assert parse_policy(data).version != policy_from_text(text).version


def _problems(data) -> str:
    with pytest.raises(PolicyError) as e:
        parse_policy(data)
    return str(e.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("version"), "version: required key 'version' is missing; add `version: 1`"),
        (lambda d: d.update(version=2), "version: unsupported version 2"),
        (lambda d: d.update(colour="red"), "colour: unknown key 'colour'; allowed keys:"),
        (lambda d: d["models"][0].update(context_window=0), "models[0].context_window: must be > 0"),
        (lambda d: d["models"][0].update(capabilities=["chat", "fly"]), "models[0].capabilities[1]: must be one of"),
        (lambda d: d["models"][1].update(input_usd_per_1m=-1), "models[1].input_usd_per_1m: must be a finite number >= 0"),
        (lambda d: d["models"][1].update(input_usd_per_1m=0.1234567), "at most 6 decimal places"),
        (lambda d: d["models"][0].pop("latency"), "models[0].latency: required key 'latency' is missing"),
        (lambda d: d["tenants"][0].update(api_key_hashes=["sk-live-abc"]), "tenants[0].api_key_hashes[0]: looks like a plaintext API key"),
        (lambda d: d["tenants"][0].update(regions=[]), "tenants[0].regions: must not be empty"),
        (lambda d: d["tenants"][0].update(budget={"per_day_usd": "lots"}), "tenants[0].budget.per_day_usd: must be a number of USD"),
        (lambda d: d["tenants"][0].update(rate_limit={"requests_per_minute": 0}), "tenants[0].rate_limit.requests_per_minute: must be > 0"),
        (lambda d: d.update(rules=[{"name": "r", "when": {"safety": ["S15"]}, "then": {"deny": "x"}}]), "rules[0].when.safety: unknown hazard codes ['S15']"),
        (lambda d: d.update(rules=[{"name": "r", "when": {"pii": ["passport"]}, "then": {"deny": "x"}}]), "rules[0].when.pii: unknown PII kinds ['passport']"),
        (lambda d: d.update(rules=[{"name": "r", "then": {"prefer": "best"}}]), "rules[0].then.prefer: must be one of 'cheapest' or 'fastest'"),
        (lambda d: d.update(rules=[{"name": "r", "then": {"require_models": ["gpt-9"]}}]), "rules[0].then.require_models[0]: unknown model 'gpt-9'; use a catalog model"),
        (lambda d: d.update(rules=[{"name": "r", "when": {"model": ["gpt-9"]}, "then": {"deny": "x"}}]), "rules[0].when.model[0]: unknown model 'gpt-9'; use a catalog model or 'auto'"),
        (lambda d: d.update(rules=[{"name": "r", "when": {"tenants": ["zed"]}, "then": {"deny": "x"}}]), "rules[0].when.tenants[0]: unknown tenant 'zed'"),
        (lambda d: d.update(rules=[{"name": "r", "then": {"require_tiers": ["gold"]}}]), "rules[0].then.require_tiers[0]: unknown safety tier 'gold'"),
        (lambda d: d.update(rules=[{"name": "r", "then": {"require_regions": ["mars"]}}]), "rules[0].then.require_regions[0]: no model is in region 'mars'"),
        (lambda d: d.update(rules=[{"name": "r", "then": {"deny": "x", "forbid_models": ["local"]}}]), "rules[0].then.deny: deny ends the request, so forbid_models would never apply"),
        (lambda d: d.update(rules=[{"name": "r", "then": {}}]), "rules[0].then: the rule does nothing"),
        (lambda d: d.update(rules=[{"name": "r", "when": {"min_prompt_tokens": 9, "max_prompt_tokens": 3}, "then": {"deny": "x"}}]), "rules[0].when.max_prompt_tokens: max_prompt_tokens 3 < min_prompt_tokens 9"),
        (lambda d: d.update(fallbacks={"local": ["local"]}), "fallbacks.local[0]: 'local' falls back to itself"),
        (lambda d: d.update(fallbacks={"local": ["nope"]}), "fallbacks.local[0]: unknown model 'nope'"),
        (lambda d: d.update(anonymous_tenant="ghost"), "anonymous_tenant: unknown tenant 'ghost'"),
        (lambda d: d["models"].append(dict(d["models"][0])), "models[2].name: duplicate model name 'local' (also models[0])"),
    ],
)  # fmt: skip
def test_bad_policy_is_rejected_naming_the_field(policy_data, edit, expected):
    data = policy_data()
    edit(data)
    assert expected in _problems(data)


def test_same_key_for_two_tenants_is_rejected(policy_data):
    digest = hash_api_key("sk-shared")
    data = policy_data()
    data["tenants"][0]["api_key_hashes"] = [digest]
    data["tenants"][1]["api_key_hashes"] = [digest]
    assert "tenants[1].api_key_hashes[0]: the same key hash belongs to tenant 'a'" in _problems(
        data
    )


def test_errors_carry_file_and_line(tmp_path, policy_data):
    data = policy_data()
    data["models"][1]["context_window"] = -5
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(path) in str(e.value)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "-5" in text)
    assert f"models[1].context_window (line {line}): must be > 0" in str(e.value)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="must be a mapping"):
        policy_from_text("- a\n- b\n")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    price=st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
)
def test_any_price_with_six_decimals_is_held_exactly(policy_data, price):
    data = policy_data()
    data["models"][1]["input_usd_per_1m"] = str(price)
    m = parse_policy(data).model("eu-api")
    assert Decimal(m.input_price_pico) == price * 10**6
