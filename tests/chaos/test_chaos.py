"""The chaos suite, short version of every scenario: no request lost, outputs equal to a
fault-free run, recovery within each scenario's bound; then `expertmesh fmea` on a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.chaos.runner import ChaosError, Runner, load_scenario
from expertmesh.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "examples" / "chaos").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_passes_in_its_short_version(path, tmp_path):
    scenario = load_scenario(path).shortened()
    report = Runner(scenario, tmp_path / scenario.name).run()
    assert report.passed, report.failures
    assert report.ok > 0 and report.lost == 0 and report.wrong_outputs == 0
    for mode in scenario.expect.detected:
        assert mode in report.detected
    if path.stem == "kill-shard":
        out = tmp_path / "fmea"
        run = tmp_path / scenario.name
        assert (
            main(
                [
                    "fmea",
                    "--spans",
                    str(run / "spans.jsonl"),
                    "--metrics",
                    str(run / "metrics.jsonl"),
                    "--events",
                    str(run / "events.jsonl"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        table = (out / "fmea.md").read_text()
        assert "expert_shard_lost" in table and "docs/runbooks/expert_shard_lost.md" in table
        assert "<img" in (out / "fmea.html").read_text()


def test_bad_scenario_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfaults: [{kind: melt_cpu}]\n")
    with pytest.raises(ChaosError, match=r"faults\.0\.kind"):
        load_scenario(bad)


def test_only_a_killed_node_can_be_restored(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfaults: [{kind: drain_node, restore_after_s: 2}]\n")
    with pytest.raises(ChaosError, match=r"faults\.0: .*restore_after_s is for kill_node"):
        load_scenario(bad)
