"""check_policy: tenants with no eligible model, unreachable rules, conflicting rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.policies import check_policy, load_policy, parse_policy

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "policies").glob("*.yaml"))


def findings(data) -> list[str]:
    return [str(f) for f in check_policy(parse_policy(data))]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_are_clean(path):
    assert check_policy(load_policy(path)) == []


def test_minimal_policy_is_clean(policy_data):
    assert findings(policy_data()) == []


def test_tenant_whose_regions_hold_no_model(policy_data):
    data = policy_data()
    data["tenants"][1]["regions"] = ["apac"]
    (f,) = [x for x in findings(data) if x.startswith("error")]
    assert f.startswith("error: tenants[b]: no model is in the tenant's regions ['apac']")


def test_tenant_left_without_model_by_an_unconditional_rule(policy_data):
    data = policy_data(
        rules=[
            {
                "name": "only-local",
                "when": {"tenants": ["b"]},
                "then": {"require_models": ["local"]},
            }
        ]
    )
    out = findings(data)
    assert any(
        x.startswith("error: tenants[b]: no eligible model: rules[0] (only-local) always applies")
        for x in out
    )


def test_rule_after_a_covering_deny_is_unreachable(policy_data):
    data = policy_data(
        rules=[
            {"name": "deny-weapons", "when": {"safety": ["S9", "S1"]}, "then": {"deny": "no"}},
            {"name": "weapons-strict", "when": {"safety": ["S9"], "task": ["chat"]}, "then": {"require_tiers": ["strict"]}},
            {"name": "crime-strict", "when": {"safety": ["S2"]}, "then": {"require_tiers": ["strict"]}},
        ]
    )  # fmt: skip
    out = findings(data)
    assert any(
        x.startswith("error: rules[1] (weapons-strict): unreachable: rules[0] (deny-weapons)")
        for x in out
    )
    assert not any("crime-strict" in x and "unreachable" in x for x in out)


def test_rules_that_together_leave_no_model_conflict(policy_data):
    data = policy_data(
        rules=[
            {"name": "tools-need-api", "when": {"task": ["code"]}, "then": {"require_models": ["eu-api"]}},
            {"name": "pii-local", "when": {"pii": "any"}, "then": {"require_regions": ["local"]}},
        ]
    )  # fmt: skip
    out = findings(data)
    assert any(
        x.startswith("error: rules[1] (pii-local): conflicts with rules[0] (tools-need-api)")
        and "tenant 'a'" in x
        for x in out
    )


def test_rules_that_cannot_match_one_request_do_not_conflict(policy_data):
    data = policy_data(
        rules=[
            {"name": "code-api", "when": {"task": ["code"]}, "then": {"require_models": ["eu-api"]}},
            {"name": "chat-local", "when": {"task": ["chat"], "tenants": ["a"]}, "then": {"require_models": ["local"]}},
        ]
    )  # fmt: skip
    assert findings(data) == []


def test_single_rule_leaving_a_tenant_no_model(policy_data):
    data = policy_data(
        rules=[
            {"name": "pii-local", "when": {"pii": "any"}, "then": {"require_regions": ["local"]}}
        ]
    )
    (f,) = findings(data)
    assert f.startswith("error: rules[0] (pii-local): leaves tenant 'b' no eligible model")
    assert "use `deny`" in f


def test_different_preferences_on_overlapping_rules_warn(policy_data):
    data = policy_data(
        rules=[
            {"name": "fast", "when": {"min_prompt_tokens": 100}, "then": {"prefer": "fastest"}},
            {"name": "cheap", "when": {"max_prompt_tokens": 500}, "then": {"prefer": "cheapest"}},
        ]
    )  # fmt: skip
    (f,) = findings(data)
    assert f.startswith("warning: rules[1] (cheap): prefers 'cheapest' but rules[0] (fast)")


def test_model_no_tenant_may_use_warns(policy_data):
    data = policy_data()
    data["models"][1]["regions"] = ["eu", "us"]  # must be allowed in every region it uses
    out = findings(data)
    assert "warning: models[eu-api]: no tenant may use it" in " ".join(out)
