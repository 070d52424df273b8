"""`benchmarks/common.write_result`: every result file carries what makes its figures checkable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import common


def test_write_result_adds_commit_command_baseline_and_machine(tmp_path: Path) -> None:
    path = common.write_result(
        "bench_x",
        {"figure": 1.5},
        command="python benchmarks/bench_x.py --quick",
        baseline={"naive_us": 3.0},
        results_dir=tmp_path,
    )
    assert path == tmp_path / "bench_x.json"
    doc = json.loads(path.read_text())
    assert doc["name"] == "bench_x" and doc["figure"] == 1.5
    assert doc["command"] == "python benchmarks/bench_x.py --quick"
    assert doc["baseline"] == {"naive_us": 3.0}
    assert len(doc["commit"]) == 40 and isinstance(doc["dirty_files"], list)
    machine = doc["machine"]
    for key in ("cpu_model", "cpu_count", "memory_gib", "python", "torch", "ray"):
        assert machine[key], key
    assert doc["timestamp"].endswith("+00:00")


def test_default_results_folder_is_committed_benchmarks_results() -> None:
    assert common.RESULTS_DIR == common.REPO_ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["", "a/b", "x.json", ".hidden"])
def test_a_name_that_is_not_a_file_stem_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bare file stem"):
        common.write_result(name, {}, results_dir=tmp_path)


def test_payload_may_not_overwrite_the_provenance_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['commit'\]"):
        common.write_result("bench_x", {"commit": "fake"}, results_dir=tmp_path)


def test_write_json_keeps_its_signature(tmp_path: Path) -> None:
    path = common.write_json(tmp_path / "sub" / "r.json", {"a": 1})
    doc = json.loads(path.read_text())
    assert doc["a"] == 1 and "machine" in doc and "timestamp" in doc
