"""`expertmesh fmea` and `expertmesh logs --request ID`, through `expertmesh.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.cli import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the table at 80 columns


def test_fmea_prints_the_table_and_writes_both_reports(recorded_run, tmp_path: Path, capsys):
    out = tmp_path / "report"
    argv = ["fmea", "--spans", str(recorded_run.spans), "--metrics", str(recorded_run.metrics)]
    assert main([*argv, "--events", str(recorded_run.events), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert_shard_lost" in printed and "High" in printed
    assert "docs/runbooks/node_lost.md" in printed
    assert (out / "fmea.md").exists()
    assert "data:image/png;base64," in (out / "fmea.html").read_text()


def test_fmea_with_a_missing_file_notes_it_and_still_reports(recorded_run, tmp_path, capsys):
    missing = tmp_path / "no-events.jsonl"
    assert main(["fmea", "--spans", str(recorded_run.spans), "--events", str(missing),
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "no-events.jsonl does not exist" in printed
    assert (tmp_path / "fmea.html").exists()


def test_fmea_alone_reads_the_platforms_fault_events(tmp_path, monkeypatch, capsys):
    from expertmesh.observability.events import EventLog, FaultEvent

    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    (tmp_path / "logs").mkdir()
    with EventLog(tmp_path / "logs" / "events.jsonl") as events:  # what a replica writes
        events.emit(FaultEvent("detected", "node_lost", target="cpu-slow"))
        events.emit(FaultEvent("recovered", "node_lost", target="cpu-slow"))
    assert main(["fmea", "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "reading the platform's fault events" in printed
    table = (tmp_path / "report" / "fmea.md").read_text()
    row = next(line for line in table.splitlines() if "node_lost" in line)
    assert "| 1 |" in row  # one incident observed


def test_fmea_on_a_corrupt_file_is_one_clear_error(tmp_path: Path, capsys):
    spans = tmp_path / "spans.jsonl"
    spans.write_text("{not json\n")
    assert main(["fmea", "--spans", str(spans), "--out", str(tmp_path)]) == 2
    assert "spans.jsonl:1" in capsys.readouterr().err


def _log_dir(tmp_path: Path, trace_id: str) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = {
        "api-1.jsonl": [
            {"time_unix_nano": 1, "process": "api", "level": "INFO", "logger": "serving",
             "message": "accepted", "request_id": "req-3"},
        ],
        "shard-0-2.jsonl": [
            {"time_unix_nano": 2, "process": "shard-0", "level": "WARNING", "logger": "cluster",
             "message": "slow dispatch", "trace_id": trace_id},
        ],
    }  # fmt: skip
    for name, records in lines.items():
        (logs / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return logs


def test_logs_prints_the_request_path_and_its_trace(recorded_run, tmp_path: Path, capsys):
    [root] = [
        json.loads(line)
        for line in recorded_run.spans.read_text().splitlines()
        if json.loads(line)["attributes"].get("expertmesh.request_id") == "req-3"
    ]
    logs = _log_dir(tmp_path, root["trace_id"])
    argv = ["logs", "--request", "req-3", "--dir", str(logs), "--spans", str(recorded_run.spans)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("accepted") < printed.index("slow dispatch")
    assert "shard-0" in printed and "WARNING" in printed
    assert "POST /v1/chat/completions" in printed and "engine.decode" in printed


def test_logs_for_an_unknown_request_exits_1(tmp_path: Path, capsys):
    logs = _log_dir(tmp_path, "0" * 32)
    assert main(["logs", "--request", "req-404", "--dir", str(logs)]) == 1
    assert "no log lines" in capsys.readouterr().out


def test_logs_without_a_log_directory_is_one_clear_error(tmp_path: Path, capsys):
    assert main(["logs", "--request", "req-1", "--dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
