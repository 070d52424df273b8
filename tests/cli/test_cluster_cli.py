"""`expertmesh cluster plan|up` and `generate --cluster`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.cli import main
from expertmesh.cluster.placement import Placement

ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "examples" / "topologies" / "mixed.yaml"


def test_plan_prints_every_node_balance_and_bytes(capsys, tmp_path):
    out_json = tmp_path / "placement.json"
    assert (
        main(["cluster", "plan", "--topology", str(MIXED), "--embedded", "--json", str(out_json)])
        == 0
    )
    out = capsys.readouterr().out
    for node in ("gpu-0", "cpu-fast", "cpu-slow"):
        assert node in out
    assert "balance" in out and "cross-node bytes per token" in out
    placement = Placement.from_json(out_json.read_text())
    held = {n: len(placement.experts_on(n)) for n in placement.nodes}
    assert held["gpu-0"] == max(held.values())  # the fastest node (and the attention node)
    for name in ("ours", "eplb", "attention_only"):
        assert name in out
    predicted = json.loads(out_json.read_text())["predicted_step_s"]
    assert predicted["ours"] <= min(predicted["eplb"], predicted["attention_only"])


SIX_NODES = """
version: 1
name: six
nodes:
  - {name: fast-a, kind: cpu, speed: 2.0, memory_gb: 16, labels: {rack: r1}, attention: true}
  - {name: fast-b, kind: cpu, speed: 2.0, memory_gb: 16, labels: {rack: r1}}
  - {name: far-1, kind: cpu, speed: 0.5, memory_gb: 8, labels: {rack: r2}}
  - {name: far-2, kind: cpu, speed: 0.5, memory_gb: 8, labels: {rack: r2}}
  - {name: far-3, kind: cpu, speed: 0.5, memory_gb: 8, labels: {rack: r2}}
  - {name: far-4, kind: cpu, speed: 0.5, memory_gb: 8, labels: {rack: r2}}
links:
  same_rack: {bandwidth_gbps: 25, latency_us: 20}
  default: {bandwidth_gbps: 1, latency_us: 200}
"""


@pytest.mark.parametrize("call_overhead_us", [0, 1200])
def test_plan_keeps_experts_off_far_slow_nodes(tmp_path, capsys, call_overhead_us):
    """Two fast nodes and four slow ones behind a slow uplink (the planner used to leave a
    fast node empty and load the far ones): with the demo's tiny experts the far nodes' layer
    calls cost more than they save."""
    topology = tmp_path / "six.yaml"
    topology.write_text(SIX_NODES + f"call_overhead_us: {call_overhead_us}\n")
    out_json = tmp_path / "plan.json"
    argv = ["cluster", "plan", "--topology", str(topology), "--reference-tflops", "0.05"]
    assert main([*argv, "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    far = [n for n in doc["nodes"] if n.startswith("far")]
    assert all(doc["node_tokens"][n] == 0 for n in far)
    assert doc["predicted_step_s"]["ours"] <= min(doc["predicted_step_s"].values())
    assert doc["compared"]["eplb"]["nodes_used"] == sorted(doc["nodes"])  # EPLB uses them all


def test_plan_with_a_trace_replicates_the_hot_expert(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    assert (
        main(
            [
                "generate",
                "--model",
                "demo",
                "--max-tokens",
                "4",
                "--record-trace",
                str(trace),
                "ROMEO:",
            ]
        )
        == 0
    )
    data = json.loads(trace.read_text())
    layers = {k: [1] * data["num_experts"] for k in data["layers"]}
    for counts in layers.values():
        counts[5] = 400
    trace.write_text(json.dumps({"num_experts": data["num_experts"], "layers": layers}))
    out_json = tmp_path / "placement.json"
    capsys.readouterr()
    assert (
        main(
            [
                "cluster",
                "plan",
                "--topology",
                str(MIXED),
                "--embedded",
                "--trace",
                str(trace),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    placement = Placement.from_json(out_json.read_text())
    hot = [reps for (layer, e), reps in placement.replicas.items() if e == 5]
    assert hot and all(len(r) >= 2 for r in hot)


def test_trace_for_another_model_is_one_clear_line(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"num_experts": 3, "layers": {}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "expertmesh.cli",
            "cluster",
            "plan",
            "--topology",
            str(MIXED),
            "--trace",
            str(trace),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "num_experts is 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_topology_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MIXED.read_text().replace("speed: 0.5", "speed: -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", "cluster", "plan", "--topology", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "nodes[2].speed" in proc.stderr or "nodes.2.speed" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_generate_on_the_cluster_prints_the_same_text_as_without():
    args = [
        sys.executable,
        "-m",
        "expertmesh.cli",
        "generate",
        "--model",
        "demo",
        "--max-tokens",
        "10",
        "--seed",
        "0",
        "--temperature",
        "0",
        "ROMEO:",
    ]
    alone = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    clustered = subprocess.run(
        [*args, "--cluster", str(MIXED)], capture_output=True, text=True, check=True
    ).stdout
    assert clustered == alone
    assert alone.startswith("ROMEO:")


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra", [[], ["--colocate", "--profile", "--batch", "8"]], ids=["shards", "colocated"]
)
def test_cluster_up_places_the_demo_and_serves_one_request(extra):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "expertmesh.cli",
            "cluster",
            "up",
            "--topology",
            str(MIXED),
            "--exit-after-ready",
            "--max-tokens",
            "4",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for node in ("gpu-0", "cpu-fast", "cpu-slow"):
        assert f"shard {node}" in proc.stdout
