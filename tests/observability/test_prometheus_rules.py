"""The shipped alerts checked by Prometheus's own tool: `promtool check rules` on the rules of
manifests/base/prometheusrule.yaml, and `promtool test rules` on unit tests for every alert
(tests/observability/promtool/*.yaml: recorded series in, the alerts that fire out)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULE = REPO / "manifests" / "base" / "prometheusrule.yaml"
UNIT_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
RULES_NAME = "expertmesh-rules.yaml"
"""What the unit tests' `rule_files` name: the PrometheusRule's groups as a plain rules file."""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH: run `make prometheus-tools` (Debian's prometheus)")
    return path


def alerts() -> list[str]:
    rule = yaml.safe_load(RULE.read_text())
    return [a["alert"] for g in rule["spec"]["groups"] for a in g["rules"]]


def plain_rules(directory: Path) -> Path:
    """The CRD's `spec` is a Prometheus rules file (`groups:`); write it where promtool reads."""
    spec = yaml.safe_load(RULE.read_text())["spec"]
    path = directory / RULES_NAME
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_shipped_rules(tmp_path):
    tool = promtool()
    result = run([tool, "check", "rules", str(plain_rules(tmp_path))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass(tmp_path):
    tool = promtool()
    plain_rules(tmp_path)
    copies = []
    for test in UNIT_TESTS:
        shutil.copy(test, tmp_path / test.name)
        copies.append(test.name)
    result = run([tool, "test", "rules", *copies], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_sees_it_fire_and_stay_quiet():
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in UNIT_TESTS:
        for case in yaml.safe_load(test.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) <= fired, f"never seen firing: {set(alerts()) - fired}"
    assert set(alerts()) <= quiet, f"never seen quiet: {set(alerts()) - quiet}"


def test_a_broken_rule_fails_promtool(tmp_path):
    """The check can fail: a rule with a PromQL error is refused."""
    tool = promtool()
    text = plain_rules(tmp_path).read_text()
    broken = re.sub(
        r"expr: max\(expertmesh_tpot_spread\) > 3", "expr: max(expertmesh_tpot_spread >", text
    )
    assert broken != text
    (tmp_path / RULES_NAME).write_text(broken)
    result = run([tool, "check", "rules", RULES_NAME], tmp_path)
    assert result.returncode != 0
