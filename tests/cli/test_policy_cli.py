"""`expertmesh policy check|replay|hash-key`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from expertmesh.cli import main
from expertmesh.policies import hash_api_key, load_policy
from expertmesh.routing import BudgetLedger, DecisionLog, SelectionRequest, Selector

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def test_check_clean_policy_exits_0(capsys):
    assert main(["policy", "check", str(EXAMPLES / "enterprise.yaml")]) == 0
    out = capsys.readouterr().out
    assert "enterprise@" in out and "0 errors, 0 warnings" in out


def test_check_reports_conflicts_and_exits_1(tmp_path, capsys):
    data = yaml.safe_load((EXAMPLES / "default.yaml").read_text())
    data["rules"].append(
        {"name": "after-deny", "when": {"safety": ["S4"]}, "then": {"prefer": "fastest"}}
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["policy", "check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["findings"][0]["severity"] == "error"
    assert "unreachable" in report["findings"][0]["message"]


def test_check_invalid_policy_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nname: x\nmodels: []\ntenants: []\n")
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertmesh policy: error: invalid policy")
    assert "models (line 3): must not be empty" in err


def test_replay_prints_changes_and_writes_json(tmp_path, capsys):
    log = tmp_path / "decisions.jsonl"
    selector = Selector(
        load_policy(EXAMPLES / "enterprise.yaml"),
        ledger=BudgetLedger(tmp_path / "budgets.sqlite"),
        decision_log=DecisionLog(log),
    )
    selector.decide(SelectionRequest("globex-us", "hello", max_tokens=50))
    selector.decide(SelectionRequest("acme-eu", "summarise this memo", max_tokens=50))
    new = yaml.safe_load((EXAMPLES / "enterprise.yaml").read_text())
    new["rules"].insert(0, {"name": "no-us", "then": {"forbid_models": ["us-mini", "us-frontier"]}})
    new_path = tmp_path / "new.yaml"
    new_path.write_text(yaml.safe_dump(new))
    out_json = tmp_path / "report.json"
    code = main(
        ["policy", "replay", "--log", str(log), "--policy", str(new_path), "--json", str(out_json)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Changed requests (1 of 1)" in out and "us-mini" in out
    report = json.loads(out_json.read_text())
    assert report["totals"]["requests"] == 2 and report["totals"]["violations"] == 1


def test_replay_bad_log_is_one_clear_error(tmp_path, capsys):
    log = tmp_path / "d.jsonl"
    log.write_text("{}\n")
    assert (
        main(["policy", "replay", "--log", str(log), "--policy", str(EXAMPLES / "default.yaml")])
        == 2
    )
    assert "d.jsonl:1: not a decision record" in capsys.readouterr().err


def test_hash_key(capsys, monkeypatch):
    assert main(["policy", "hash-key", "sk-expertmesh-dev"]) == 0
    assert capsys.readouterr().out.strip() == hash_api_key("sk-expertmesh-dev")
    assert main(["policy", "hash-key", "--new"]) == 0
    key_line, hash_line = capsys.readouterr().out.splitlines()
    key = key_line.split()[-1]
    assert key.startswith("sk-expertmesh-") and hash_line.split()[-1] == hash_api_key(key)
