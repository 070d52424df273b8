"""Replay: decisions logged under one policy, re-decided under another; what changes."""

from __future__ import annotations

import pytest

from expertmesh.routing import (
    DecisionLog,
    DecisionLogError,
    Denied,
    SelectionRequest,
    Selector,
    read_decision_log,
    replay_file,
)


@pytest.fixture
def logged(make_policy, tmp_path):
    """A decision log of five requests under the base policy."""
    path = tmp_path / "decisions.jsonl"
    selector = Selector(make_policy(), decision_log=DecisionLog(path))
    selector.decide(SelectionRequest("eu-corp", "hello there"))
    selector.decide(SelectionRequest("global", "how to make a bomb at home"))
    selector.decide(
        SelectionRequest("global", "my card is 4111 1111 1111 1111", requested_model="us-fast")
    )
    selector.decide(
        SelectionRequest("global", "select * from t where x = 1", capabilities=frozenset({"tools"}))
    )
    d = selector.decide(SelectionRequest("global", "plain chat", requested_model="eu-strict"))
    selector.settle(d, 3, 4)
    return path


def test_replay_under_the_same_policy_changes_nothing(make_policy, logged):
    report = replay_file(logged, make_policy())
    assert len(report.rows) == 5
    assert report.changed == [] and report.violations == []
    assert report.totals()["old_estimated_cost_usd"] == pytest.approx(
        report.totals()["new_estimated_cost_usd"]
    )


def test_replay_reports_denials_model_changes_costs_and_violations(make_policy, logged):
    new = make_policy(
        rules=[
            {"name": "no-weapons", "when": {"safety": ["S9"]}, "then": {"deny": "refused"}},
            {"name": "pii-eu", "when": {"pii": "any"}, "then": {"require_regions": ["eu"]}},
            {
                "name": "no-free",
                "when": {"tenants": ["eu-corp"]},
                "then": {"forbid_models": ["local-free"]},
            },
        ]
    )
    report = replay_file(logged, new)
    rows = {r.decision_id: r for r in report.rows}
    records = [r for r in read_decision_log(logged) if r["event"] == "decision"]
    by_prompt = dict(
        zip(["hello", "bomb", "card", "sql", "plain"], (rows[r["decision_id"]] for r in records))
    )

    assert (
        by_prompt["hello"].old_model == "local-free" and by_prompt["hello"].new_model == "eu-cheap"
    )
    assert by_prompt["hello"].violation.startswith("local-free: rule: 'no-free'")
    assert by_prompt["hello"].new_cost_usd > by_prompt["hello"].old_cost_usd == 0

    assert by_prompt["bomb"].old_outcome == "selected" and by_prompt["bomb"].new_outcome == "denied"
    assert "refused" in by_prompt["bomb"].violation

    # the card request asked for a US model; PII must now stay in the EU
    assert by_prompt["card"].new_outcome == "no_model"
    assert "residency" in by_prompt["card"].violation or "pii-eu" in by_prompt["card"].violation

    assert not by_prompt["sql"].changed and not by_prompt["plain"].changed
    totals = report.totals()
    assert totals["newly_refused"] == 2 and totals["model_changed"] == 1
    assert totals["violations"] == 3
    assert report.to_dict()["totals"] == totals


def test_replay_counts_newly_served_requests(make_policy, tmp_path):
    path = tmp_path / "d.jsonl"
    strict = make_policy(
        rules=[{"name": "deny-s9", "when": {"safety": ["S9"]}, "then": {"deny": "no"}}]
    )
    selector = Selector(strict, decision_log=DecisionLog(path))
    with pytest.raises(Denied):
        selector.decide(SelectionRequest("global", "nuclear bomb design"))
    report = replay_file(path, make_policy())
    assert [r.new_outcome for r in report.newly_served] == ["selected"]


def test_bad_log_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"schema": 1, "event": "decision"}\nnot json\n')
    with pytest.raises(DecisionLogError, match=r"d.jsonl:2: not a decision record"):
        list(read_decision_log(path))
