"""The FMEA built from a recorded run (real exporters and EventLog), as Markdown and HTML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from expertmesh.observability.events import FAILURE_MODES
from expertmesh.observability.fmea import FmeaInputs, build_fmea, expert_load
from expertmesh.observability.fmea_report import NO_HEATMAP, render_markdown, write_report
from expertmesh.observability.jsonl_exporter import read_metrics


def _row(report, mode: str):
    return next(r for r in report.rows if r.failure_mode == mode)


def test_measured_times_and_effects_come_from_the_recording(recorded_run) -> None:
    report = build_fmea(
        FmeaInputs.load(recorded_run.spans, recorded_run.metrics, recorded_run.events)
    )
    assert len(report.requests) == recorded_run.requests
    assert {r.request_id for r in report.requests} == {f"req-{i}" for i in range(40)}

    shard = _row(report, "expert_shard_lost")
    assert shard.time_to_detect_p50_s == pytest.approx(0.3)
    assert shard.time_to_recover_p50_s == pytest.approx(1.5)
    assert shard.detection == 1 and shard.detection_measured  # 0.3 s
    assert (shard.requests_failed, shard.requests_delayed) == (1, 3)
    assert "1 failed, 3 delayed" in shard.effect and "scenario smoke" in shard.cause

    node = _row(report, "node_lost")
    assert node.time_to_detect_p95_s == pytest.approx(6.0)
    assert node.detection == 5
    assert node.requests_lost == 1 and node.severity == 10  # 8, raised for the lost request
    assert node.occurrence == 8  # 1 incident in 40 requests: 25 per 1000

    kv = _row(report, "kv_cache_exhausted")  # detected, never injected
    assert kv.incidents == 1 and not kv.detection_measured
    assert "injected" not in kv.cause
    assert kv.time_to_recover_p50_s == pytest.approx(0.2)


def test_observed_modes_come_first_and_every_mode_has_a_row(recorded_run) -> None:
    report = build_fmea(
        FmeaInputs.load(recorded_run.spans, recorded_run.metrics, recorded_run.events)
    )
    assert sorted(r.failure_mode for r in report.rows) == sorted(FAILURE_MODES)
    assert [r.observed for r in report.rows[:3]] == [True, True, True]
    assert not any(r.observed for r in report.rows[3:])


def test_cumulative_counter_counts_each_series_once(recorded_run) -> None:
    load = expert_load(read_metrics(recorded_run.metrics))
    assert load is not None
    assert load.layers == ("0", "1") and load.experts == ("0", "1", "2", "3")
    assert load.tokens[0] == (10, 70, 10, 10)
    assert load.tokens[1] == (25, 25, 0, 0)
    assert load.imbalance(0) == pytest.approx(2.8)


def test_markdown_has_one_row_per_mode_with_its_runbook(recorded_run) -> None:
    report = build_fmea(
        FmeaInputs.load(recorded_run.spans, recorded_run.metrics, recorded_run.events)
    )
    markdown = render_markdown(report)
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(rows) == len(FAILURE_MODES)
    for mode in FAILURE_MODES:
        [row] = [r for r in rows if r.startswith(f"| `{mode}` |")]
        assert row.endswith(f"[runbook](docs/runbooks/{mode}.md) |")
    assert "## Incidents" in markdown


def test_html_report_embeds_both_plots(recorded_run, tmp_path: Path) -> None:
    report = build_fmea(
        FmeaInputs.load(recorded_run.spans, recorded_run.metrics, recorded_run.events)
    )
    md_path, html_path = write_report(report, tmp_path / "out")
    page = html_path.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["request latency over time", "expert load heatmap"]
    assert all(len(data) > 1000 for _, data in images)
    assert "docs/runbooks/node_lost.md" in page and 'class="ap-' in page
    assert md_path.read_text().startswith("# Failure-mode and effects analysis")


def test_report_without_metrics_says_the_heatmap_is_missing(recorded_run, tmp_path: Path) -> None:
    report = build_fmea(FmeaInputs.load(recorded_run.spans, tmp_path / "absent.jsonl", None))
    md_path, html_path = write_report(report, tmp_path)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 1  # the latency plot only
    assert "not drawn" in page and "absent.jsonl does not exist" in page
    markdown = md_path.read_text()
    assert NO_HEATMAP in markdown and "no events file given" in markdown


def test_report_from_nothing_still_lists_every_mode(tmp_path: Path) -> None:
    report = build_fmea(FmeaInputs.load(None, None, None))
    _, html_path = write_report(report, tmp_path)
    assert "data:image/png" not in html_path.read_text()
    assert len(report.rows) == len(FAILURE_MODES)
