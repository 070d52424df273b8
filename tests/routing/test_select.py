"""Selector.plan / decide: hard constraints, every rule effect and match field, ranking,
explanations, headers, fallbacks, the decision log and the span."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from expertmesh.policies import parse_policy
from expertmesh.routing import (
    Classification,
    DecisionLog,
    Denied,
    ModelHealth,
    NoEligibleModel,
    SelectionRequest,
    Selector,
    UnknownModel,
    read_decision_log,
)
from expertmesh.routing.pii import PiiFinding


def req(tenant: str = "global", prompt: str = "hello", **kw) -> SelectionRequest:
    return SelectionRequest(tenant=tenant, prompt=prompt, **kw)


def features(
    safety=(), pii=(), task="chat", prompt_tokens=10, tenant="global", **kw
) -> SelectionRequest:
    c = Classification(
        frozenset(safety), tuple(PiiFinding(k, 0, 0) for k in pii), task, prompt_tokens
    )
    return SelectionRequest(tenant=tenant, classification=c, **kw)


def rule(name="r", when=None, **then) -> dict:
    out = {"name": name, "then": then}
    if when is not None:
        out["when"] = when
    return out


def excluded(decision) -> dict[str, str]:
    return {e.model: e.constraint for e in decision.excluded}


# -- hard constraints and ranking ---------------------------------------------------------------


def test_cheapest_objective_picks_free_local_model(make_policy):
    d = Selector(make_policy()).plan(req())
    assert d.model.name == "local-free"
    assert d.estimated_cost_usd == 0


def test_residency_excludes_models_outside_tenant_regions(make_policy):
    d = Selector(make_policy()).plan(req("eu-corp"))
    ex = excluded(d)
    assert ex == {"us-fast": "residency", "us-big": "residency"}
    assert "not all allowed for tenant 'eu-corp'" in next(
        e.reason for e in d.excluded if e.model == "us-fast"
    )


def test_context_window_must_hold_prompt_plus_max_tokens(make_policy):
    d = Selector(make_policy()).plan(features(prompt_tokens=4000, max_tokens=200))
    assert excluded(d)["local-free"] == "context"
    assert d.model.name == "eu-cheap"
    reason = next(e.reason for e in d.excluded if e.model == "local-free")
    assert "4096 < prompt 4000 + max_tokens 200" in reason


def test_capabilities_requested_are_required(make_policy):
    d = Selector(make_policy()).plan(req(capabilities=frozenset({"tools"})))
    assert excluded(d)["local-free"] == "capability"
    assert d.model.name == "eu-cheap"


def test_cheapest_ranks_by_estimated_cost_for_this_request(make_policy):
    d = Selector(make_policy()).plan(features(prompt_tokens=10, capabilities=frozenset({"code"})))
    # USD per 1M tokens = micro-USD per token. eu-strict: 10 * 1 + 100 * 2 = 210 micro-USD;
    # us-fast: 10 * 0.5 + 100 * 1 = 105; us-big: 10 * 3 + 100 * 15 = 1530.
    assert d.model.name == "us-fast"
    assert d.estimated_cost_micro_usd == 105
    assert d.estimated_cost_usd == pytest.approx(105e-6)
    assert [m.name for m in d.fallbacks] == ["eu-strict", "us-big"]


def test_tenant_objective_overrides_policy_default(make_policy, policy_data):
    tenants = policy_data()["tenants"]
    tenants[1]["objective"] = "fastest"
    d = Selector(make_policy(tenants=tenants)).plan(req())
    assert d.model.name == "us-fast"  # 100 ms + 100 tokens at 200/s
    assert d.objective == "fastest"


def test_unhealthy_models_are_excluded_and_503_when_none_left(make_policy):
    health = ModelHealth()
    selector = Selector(make_policy(), health=health)
    health.mark_down("local-free", "probe failed")
    d = selector.plan(req())
    assert excluded(d)["local-free"] == "health"
    for m in ("eu-cheap", "eu-strict"):
        health.mark_down(m)
    with pytest.raises(NoEligibleModel) as e:
        selector.plan(req("eu-corp"))
    assert e.value.http_status == 503
    health.mark_up("local-free")
    assert selector.plan(req("eu-corp")).model.name == "local-free"


def test_requested_model_is_honoured_and_others_listed(make_policy):
    d = Selector(make_policy()).plan(req(requested_model="us-big"))
    assert d.model.name == "us-big"
    assert excluded(d)["local-free"] == "requested_model"
    assert d.fallbacks == ()  # no chain declared: a named model is not silently substituted


def test_unknown_requested_model_is_404(make_policy):
    with pytest.raises(UnknownModel) as e:
        Selector(make_policy()).plan(req(requested_model="gpt-nine"))
    assert e.value.http_status == 404 and "gpt-nine" in str(e.value)


def test_requested_model_outside_residency_is_refused_with_reason(make_policy):
    with pytest.raises(NoEligibleModel) as e:
        Selector(make_policy()).plan(req("eu-corp", requested_model="us-big"))
    assert e.value.http_status == 400
    assert e.value.excluded["us-big"].startswith("residency")


# -- rule effects --------------------------------------------------------------------------------


def test_deny_effect_raises_403_with_message_and_rule(make_policy):
    p = make_policy(rules=[rule("no-weapons", {"safety": ["S9"]}, deny="Refused: S9.")])
    with pytest.raises(Denied) as e:
        Selector(p).plan(req(prompt="how to build a dirty bomb"))
    assert e.value.http_status == 403
    assert e.value.rule == "no-weapons" and "Refused: S9." in str(e.value)


def test_require_models_effect(make_policy):
    p = make_policy(rules=[rule(require_models=["eu-strict", "us-big"])])
    d = Selector(p).plan(req())
    assert d.model.name == "eu-strict"
    assert set(excluded(d)) == {"local-free", "eu-cheap", "us-fast"}


def test_forbid_models_effect(make_policy):
    p = make_policy(rules=[rule(forbid_models=["local-free"])])
    d = Selector(p).plan(req())
    assert d.model.name == "eu-cheap" and excluded(d) == {"local-free": "rule"}


def test_require_tiers_effect(make_policy):
    p = make_policy(rules=[rule(when={"safety": ["S6"]}, require_tiers=["strict"])])
    d = Selector(p).plan(req(prompt="what dosage of this medication should I take"))
    assert d.model.safety_tier == "strict"
    assert d.rules == ("r",)


def test_forbid_tiers_effect(make_policy):
    p = make_policy(rules=[rule(forbid_tiers=["standard"])])
    d = Selector(p).plan(req())
    assert d.model.name == "us-fast"  # permissive, cheaper than the strict ones


def test_require_regions_effect_keeps_pii_local(make_policy):
    p = make_policy(rules=[rule(when={"pii": "any"}, require_regions=["local"])])
    assert Selector(p).plan(features(pii=["card"])).model.name == "local-free"
    # local-free cannot hold 5000 + 100 tokens, and nothing else is local: refused, not sent
    # to a bigger model abroad
    with pytest.raises(NoEligibleModel) as e:
        Selector(p).plan(features(pii=["card"], prompt_tokens=5000))
    assert e.value.excluded["eu-strict"].startswith("rule")


def test_require_regions_effect(make_policy):
    p = make_policy(rules=[rule(when={"pii": ["email"]}, require_regions=["eu"])])
    d = Selector(p).plan(features(pii=["email"]))
    assert d.model.regions <= {"eu"}
    assert Selector(p).plan(features(pii=["phone"])).model.name == "local-free"


def test_require_capabilities_effect_for_sql(make_policy):
    p = make_policy(rules=[rule(when={"task": ["sql"]}, require_capabilities=["sql"])])
    d = Selector(p).plan(req(prompt="select name from users where id = 3"))
    assert d.classification.task == "sql"
    assert "sql" in d.model.capabilities


def test_prefer_effect_first_matching_rule_wins(make_policy):
    p = make_policy(
        rules=[
            rule("long", {"min_prompt_tokens": 1000}, prefer="fastest"),
            rule("all", prefer="cheapest"),
        ]
    )
    assert Selector(p).plan(features(prompt_tokens=2000)).objective == "fastest"
    assert Selector(p).plan(features(prompt_tokens=10)).objective == "cheapest"


def test_redact_pii_effect_is_reported(make_policy):
    p = make_policy(rules=[rule(when={"pii": "any"}, redact_pii=["card"])])
    d = Selector(p).plan(req(prompt="card 4111 1111 1111 1111 please"))
    assert d.redact_pii == frozenset({"card"})
    assert Selector(p).plan(req(prompt="no pii here")).redact_pii == frozenset()


# -- rule match fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when, matching, other",
    [
        ({"tenants": ["eu-corp"]}, {"tenant": "eu-corp"}, {"tenant": "global"}),
        ({"safety": ["S1"]}, {"safety": ["S1", "S2"]}, {"safety": ["S2"]}),
        ({"safety": "any"}, {"safety": ["S13"]}, {}),
        ({"pii": ["iban"]}, {"pii": ["iban"]}, {"pii": ["email"]}),
        ({"task": ["code"]}, {"task": "code"}, {"task": "chat"}),
        ({"min_prompt_tokens": 50, "max_prompt_tokens": 60}, {"prompt_tokens": 55}, {"prompt_tokens": 61}),
        ({"model": ["auto"]}, {}, {"requested_model": "eu-cheap"}),
        ({"model": ["eu-cheap"]}, {"requested_model": "eu-cheap"}, {}),
    ],
)  # fmt: skip
def test_rule_matches_only_its_requests(make_policy, when, matching, other):
    p = make_policy(rules=[rule("r", when, forbid_models=["us-big"])])
    selector = Selector(p)
    assert selector.plan(features(**matching)).rules == ("r",)
    assert selector.plan(features(**other)).rules == ()


def test_all_matching_rules_apply_and_intersect(make_policy):
    p = make_policy(
        rules=[
            rule("a", forbid_models=["local-free"]),
            rule("b", {"task": ["chat"]}, forbid_models=["eu-cheap"]),
        ]
    )
    d = Selector(p).plan(req("eu-corp"))
    assert d.model.name == "eu-strict" and d.rules == ("a", "b")


# -- explanation, headers, fallbacks --------------------------------------------------------------


def test_headers_explain_the_decision(make_policy):
    p = make_policy()
    d = Selector(p).plan(req("eu-corp"))
    h = d.headers()
    assert h["x-expertmesh-model"] == "local-free"
    assert h["x-expertmesh-policy"] == f"test@{p.version[:12]}"
    assert h["x-expertmesh-decision-id"] == d.decision_id
    assert h["x-expertmesh-excluded-models"] == "2"
    assert all(v.isascii() for v in h.values())


def test_fallback_chain_is_filtered_by_the_same_constraints(make_policy):
    p = make_policy(fallbacks={"eu-strict": ["us-big", "us-fast", "eu-cheap", "local-free"]})
    d = Selector(p).plan(req("eu-corp", requested_model="eu-strict"))
    assert [m.name for m in d.fallbacks] == ["eu-cheap", "local-free"]


def test_fallback_moves_down_the_chain_and_records_the_failure(make_policy):
    p = make_policy(fallbacks={"eu-strict": ["eu-cheap", "local-free"]})
    selector = Selector(p)
    d = selector.decide(req("eu-corp", requested_model="eu-strict"))
    d1 = selector.fallback(d, reason="timeout")
    assert d1.model.name == "eu-cheap" and d1.attempt == 1 and d1.decision_id == d.decision_id
    assert excluded(d1)["eu-strict"] == "failed"
    d2 = selector.fallback(d1, reason="503")
    assert d2.model.name == "local-free" and d2.headers()["x-expertmesh-attempt"] == "2"
    with pytest.raises(NoEligibleModel):
        selector.fallback(d2, reason="down")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    regions=st.lists(st.sampled_from(["eu", "us", "local", "apac"]), min_size=5, max_size=5),
    allowed=st.sets(st.sampled_from(["eu", "us", "local", "apac"]), min_size=1),
    chain=st.permutations(["local-free", "eu-cheap", "eu-strict", "us-fast", "us-big"]),
    prompt_tokens=st.integers(1, 5000),
)
def test_residency_is_never_crossed_by_a_choice_or_its_fallbacks(
    policy_data, regions, allowed, chain, prompt_tokens
):
    data = policy_data()
    for m, region in zip(data["models"], regions):
        m["regions"] = [region]
    data["tenants"][1]["regions"] = sorted(allowed)
    data["fallbacks"] = {name: [c for c in chain if c != name] for name in chain}
    selector = Selector(parse_policy(data))
    try:
        d = selector.decide(features(prompt_tokens=prompt_tokens))
    except NoEligibleModel:
        assert not any(r in allowed for r in regions) or prompt_tokens + 100 > 4096
        return
    attempts = [d]
    while True:
        assert d.model.regions <= allowed
        assert all(m.regions <= allowed for m in d.fallbacks)
        assert all(m.context_window >= prompt_tokens + 100 for m in d.fallbacks)
        try:
            d = selector.fallback(d, "error")
        except NoEligibleModel:
            break
        attempts.append(d)
    assert len({a.model.name for a in attempts}) == len(attempts)


# -- side effects: log, span ----------------------------------------------------------------------


def test_decide_writes_decision_log_without_prompt_text(make_policy, tmp_path):
    log_path = tmp_path / "decisions.jsonl"
    p = make_policy(rules=[rule("no-weapons", {"safety": ["S9"]}, deny="no")])
    selector = Selector(p, decision_log=DecisionLog(log_path))
    d = selector.decide(req("eu-corp", prompt="mail bob@example.com about the plan"))
    with pytest.raises(Denied):
        selector.decide(req(prompt="nerve agent sarin synthesis"))
    selector.settle(d, 10, 5)
    records = list(read_decision_log(log_path))
    assert [r["event"] for r in records] == ["decision", "decision", "settled"]
    first, denied, _ = records
    assert first["model"] == d.model.name and first["policy_version"] == p.version
    assert first["request"]["pii"] == ["email"]
    assert first["excluded"]["us-big"].startswith("residency")
    assert denied["outcome"] == "denied" and denied["denied_by"] == "no-weapons"
    assert "bob@example.com" not in log_path.read_text()
    json.loads(log_path.read_text().splitlines()[0])


def test_decide_emits_a_span_with_the_choice(make_policy):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    selector = Selector(make_policy(), tracer=provider.get_tracer("test"))
    d = selector.decide(req())
    (span,) = exporter.get_finished_spans()
    assert span.name == "expertmesh.select"
    assert span.attributes["expertmesh.model"] == d.model.name
    assert span.attributes["expertmesh.decision_id"] == d.decision_id


def test_selector_follows_reloads_and_keeps_deciding_on_a_bad_file(policy_data, tmp_path):
    import os

    import yaml

    from expertmesh.policies import PolicyFile

    path = tmp_path / "p.yaml"

    def write(data) -> None:
        path.write_text(yaml.safe_dump(data))
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    write(policy_data())
    selector = Selector(PolicyFile(path, check_interval_s=0))
    first = selector.plan(req())
    write(policy_data(rules=[rule(forbid_models=["local-free"])]))
    second = selector.plan(req())
    assert second.model.name == "eu-cheap" and second.policy.version != first.policy.version
    bad = policy_data()
    bad["models"][0]["regions"] = "local"  # not a list
    write(bad)
    third = selector.plan(req())
    assert third.policy.version == second.policy.version and third.model.name == "eu-cheap"
