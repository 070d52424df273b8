"""`benchmarks/bench_gpu.py` (the benchmark half of gpu_check.sh) runs end to end on the CPU at
a tiny size: our engine and transformers on one checkpoint, identical greedy tokens in float32,
a result JSON with a row per batch, vLLM left out with the reason, the gpu tests' junit summary
folded in."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_gpu

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">
<testcase classname="tests.gpu.test_a" name="test_ok"/>
<testcase classname="tests.gpu.test_a" name="test_bad"><failure message="x"/></testcase>
<testcase classname="tests.gpu.test_a" name="test_skip"><skipped message="no CUDA device"/></testcase>
<testcase classname="tests.gpu.test_a" name="test_ok2"/>
</testsuite></testsuites>
"""


def test_tiny_cpu_run_writes_rows_for_every_batch(tmp_path):
    junit = tmp_path / "gpu-tests.xml"
    junit.write_text(JUNIT)
    argv = ["--size", "tiny", "--device", "cpu", "--batches", "1,2", "--new-tokens", "4"]
    argv += ["--prompt-tokens", "8", "--repeats", "1", "--results-dir", str(tmp_path)]
    argv += ["--tests-junit", str(junit), "--name", "gpu_check_test"]
    assert bench_gpu.main(argv) == 0
    doc = json.loads((tmp_path / "gpu_check_test.json").read_text())
    assert doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert [r["batch"] for r in doc["rows"]] == [1, 2]
    for row in doc["rows"]:
        assert row["ours_tok_s"] > 0 and row["transformers_tok_s"] > 0
        assert row["agreement_vs_transformers"] == 1.0  # float32: the same greedy tokens
        assert "vllm_tok_s" not in row
    assert doc["vllm"]["status"].startswith("vLLM's CUDA build needs a GPU")
    assert doc["gpu_tests"] == {
        "tests": 4,
        "failures": 1,
        "errors": 0,
        "skipped": 1,
        "passed": 2,
        "failed": ["tests.gpu.test_a::test_bad"],
    }
    assert doc["baseline"].startswith("transformers generate")
    assert doc["model"]["family"] == "qwen3_moe"


def test_a_missing_junit_file_is_said_not_hidden(tmp_path):
    argv = ["--size", "tiny", "--device", "cpu", "--batches", "1", "--new-tokens", "2"]
    argv += ["--prompt-tokens", "4", "--repeats", "1", "--results-dir", str(tmp_path)]
    argv += ["--tests-junit", str(tmp_path / "absent.xml")]
    assert bench_gpu.main(argv) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "was not written" in doc["gpu_tests"]["status"]


def test_agreement_counts_tokens_before_the_first_difference():
    assert bench_gpu.agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert bench_gpu.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0


def test_vllm_is_left_out_on_the_cpu_with_the_reason():
    assert "needs a GPU" in str(bench_gpu.vllm_unavailable(torch.device("cpu")))


def test_the_vllm_child_reports_its_failure_instead_of_a_figure(tmp_path):
    """The child's command line parses and a vLLM that cannot start (not installed here)
    comes back as a status with its log, never as a number."""
    args = argparse.Namespace(
        batches="1", repeats=1, new_tokens=2, prompt_tokens=4, vllm_timeout_s=120
    )
    got = bench_gpu.run_vllm(args, tmp_path, "float32")
    assert got["status"].startswith("vLLM failed")
    assert any("vllm" in line.lower() for line in got["log_tail"])
