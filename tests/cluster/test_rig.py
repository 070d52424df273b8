"""The multi-host rig: planning (anywhere) and a real 3-node rig (as root, with netns, veth,
a bridge, htb and cgroup v1 cpu/memory; skipped with the missing feature named otherwise)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from expertmesh.cluster.rig import system
from expertmesh.cluster.rig.calibrate import LinkMeasure, measured_topology
from expertmesh.cluster.rig.plan import Machine, RigPlanError, plan_rig
from expertmesh.cluster.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "examples" / "topologies" / "mixed.yaml"
TWO_RACKS = ROOT / "examples" / "topologies" / "two-racks.yaml"
GB = 2**30


def machine(**kw: object) -> Machine:
    return Machine(**{"cores": 1.5, "memory_budget_bytes": 8 * GB, **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------ planning (no root needed)


def test_quotas_follow_speed_and_the_fastest_node_gets_one_core() -> None:
    plan = plan_rig(load_topology(MIXED), machine())
    cores = {n.name: n.cores for n in plan.nodes}
    assert cores == pytest.approx({"gpu-0": 1.0, "cpu-fast": 0.25, "cpu-slow": 0.125})


def test_quotas_never_sum_past_the_machine() -> None:
    plan = plan_rig(load_topology(TWO_RACKS), machine(cores=1.5))
    assert sum(n.cores for n in plan.nodes) <= 1.5 + 1e-9
    assert {round(n.cores, 3) for n in plan.nodes} == {0.25}


def test_memory_limits_scale_to_the_budget_in_proportion() -> None:
    plan = plan_rig(load_topology(MIXED), machine(memory_budget_bytes=8 * GB))
    mem = {n.name: n.memory_bytes for n in plan.nodes}
    assert sum(mem.values()) == pytest.approx(8 * GB, rel=1e-6)
    assert mem["cpu-fast"] / mem["gpu-0"] == pytest.approx(32 / 24)


def test_too_small_a_memory_budget_names_the_flag() -> None:
    with pytest.raises(RigPlanError, match="--memory-gb"):
        plan_rig(load_topology(TWO_RACKS), machine(memory_budget_bytes=2 * GB))


def test_links_scale_so_the_fastest_is_the_cap_and_pairs_keep_their_ratio() -> None:
    plan = plan_rig(load_topology(MIXED), machine(max_link_gbps=1.0))
    assert plan.link("gpu-0", "cpu-fast").rate_gbps == pytest.approx(1.0)
    assert plan.link("cpu-slow", "gpu-0").rate_gbps == pytest.approx(0.4)
    racks = plan_rig(load_topology(TWO_RACKS), machine(link_scale=0.02))
    assert racks.link("r1-a", "r1-b").rate_gbps == pytest.approx(0.5)
    assert racks.link("r1-a", "r2-a").rate_gbps == pytest.approx(0.02)


def test_a_speed_to_measure_cannot_be_a_quota() -> None:
    data = load_topology(MIXED).to_dict()
    data["nodes"][1]["speed"] = "measure"
    with pytest.raises(RigPlanError, match="cpu-fast"):
        plan_rig(parse_topology(data), machine())


def test_measured_topology_replaces_speeds_links_and_call_cost() -> None:
    declared = load_topology(MIXED)
    links = [
        LinkMeasure("gpu-0", "cpu-fast", 25, 20, 1.0, 0.95, 30.0),
        LinkMeasure("gpu-0", "cpu-slow", 10, 50, 0.4, 0.38, 40.0),
        LinkMeasure("cpu-fast", "cpu-slow", 10, 50, 0.4, 0.39, 50.0),
    ]
    topo, tflops = measured_topology(
        declared, {"gpu-0": 80.0, "cpu-fast": 20.0, "cpu-slow": 10.0}, links, 900.0
    )
    assert tflops == pytest.approx(110 / 5.5 / 1000)
    assert [n.speed for n in topo.nodes] == pytest.approx([4.0, 1.0, 0.5])
    assert topo.link("cpu-fast", "gpu-0").bandwidth_gbps == pytest.approx(0.95)
    assert topo.link("gpu-0", "cpu-slow").latency_us == pytest.approx(20.0)
    assert topo.call_overhead_us == 900.0
    assert parse_topology(topo.to_dict()) == topo  # the planner reads it back from YAML


def test_without_root_the_error_names_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(system.RigUnsupported, match="root"):
        system.check_support()


def test_cli_without_root_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from expertmesh.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["rig", "up", "--topology", str(MIXED)]) == 2
    err = capsys.readouterr().err
    assert "root" in err and "emulates node speed and links by sleeping" in err


def test_cli_status_without_a_rig_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from expertmesh.cli import main

    monkeypatch.setenv("EXPERTMESH_RIG_STATE", str(tmp_path / "state.json"))
    assert main(["rig", "status"]) == 2
    assert "no rig is up" in capsys.readouterr().err


# ------------------------------------------------------------------ the real rig


def _unsupported() -> str | None:
    try:
        system.check_support()
    except system.RigUnsupported as e:
        return str(e)
    from expertmesh.cluster.rig.state import RigState

    existing = RigState.load()
    if existing is not None:
        return f"a rig is already up on this machine ({existing.path}); `expertmesh rig down`"
    return None


IN_OWN_PROCESS = "EXPERTMESH_RIG_TESTS"
"""Set in the child `test_the_real_rig_tests_pass_in_their_own_process` starts: a rig driver
joins a namespace and CPU groups, which later Ray tests in the same process must not inherit."""


@pytest.mark.e2e
@pytest.mark.slow
def test_the_real_rig_tests_pass_in_their_own_process() -> None:
    if os.environ.get(IN_OWN_PROCESS):
        pytest.skip("this is the child run")
    reason = _unsupported()
    if reason:
        pytest.skip(reason)
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not own_process",
        ],
        env={**os.environ, IN_OWN_PROCESS: "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[
        -500:
    ]


@pytest.fixture(scope="module")
def rig():
    if not os.environ.get(IN_OWN_PROCESS):
        pytest.skip("runs in its own process (test_the_real_rig_tests_pass_in_their_own_process)")
    reason = _unsupported()
    if reason:
        pytest.skip(reason)
    from expertmesh.cluster.rig.rig import rig_down, rig_up

    try:
        state = rig_up(load_topology(MIXED), str(MIXED))
        yield state
    finally:
        rig_down()


@pytest.mark.e2e
@pytest.mark.slow
def test_three_node_rig_is_up_within_a_minute(rig) -> None:
    from expertmesh.cluster.rig import cgroups, netns

    assert rig.calibration["up_s"] <= 60
    assert set(rig.ray_node_ids) == {"gpu-0", "cpu-fast", "cpu-slow"}
    assert sorted(netns.namespaces("emrig")) == ["emrig-cpu-fast", "emrig-cpu-slow", "emrig-gpu-0"]
    for name in rig.ray_node_ids:
        assert cgroups.pids(name), f"no process in {name}'s cgroup"
        assert cgroups.read_limits(name)["cpu_quota_us"] > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_measured_bandwidth_is_within_20_percent_of_the_links_rate(rig) -> None:
    for link in rig.calibration["links"]:
        ratio = link["measured_gbps"] / link["rig_rate_gbps"]
        assert 0.8 <= ratio <= 1.2, link


@pytest.mark.e2e
@pytest.mark.slow
def test_measured_speed_ratios_are_within_25_percent_of_declared(rig) -> None:
    nodes = {n["name"]: n for n in rig.calibration["nodes"]}
    ref = nodes["gpu-0"]
    for n in nodes.values():
        measured = n["gflops"] / ref["gflops"]
        declared = n["declared_speed"] / ref["declared_speed"]
        assert measured / declared == pytest.approx(1.0, abs=0.25), n


@pytest.mark.e2e
@pytest.mark.slow
def test_status_probes_each_link_and_sees_every_ray_node(rig) -> None:
    from expertmesh.cluster.rig.rig import driver
    from expertmesh.cluster.rig.status import rig_status

    with driver(rig, join_cgroups=False):
        status = rig_status(rig)
    rows = {r["node"]: r for r in status["nodes"]}
    assert all(r["ray_alive"] for r in rows.values())
    assert rows["cpu-slow"]["cpu_cores"] == pytest.approx(0.125)
    assert rows["cpu-fast"]["link_measured_gbps"] == pytest.approx(1.0, rel=0.2)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("placement", ["ours", "eplb"])
def test_greedy_request_equals_the_single_process_output(rig, placement: str) -> None:
    from expertmesh.cluster.planning import baseline_placement
    from expertmesh.cluster.rig.rig import driver, launch, measured_topology
    from expertmesh.models.checkpoint import load_model, read_config
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.paths import DEMO_MODEL_DIR
    from expertmesh.models.tokenizer import Tokenizer

    prompts, params = ["ROMEO:", "To be"], SamplingParams(max_tokens=8, ignore_eos=True)
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    expected = [
        c.text for c in Generator(load_model(DEMO_MODEL_DIR), tok).generate(prompts, params)
    ]
    chosen = None
    if placement == "eplb":  # experts on all three nodes: every step crosses the links
        chosen = baseline_placement("eplb", measured_topology(rig), read_config(DEMO_MODEL_DIR))
    with driver(rig):
        ep = launch(DEMO_MODEL_DIR, rig, placement=chosen)
        got = [c.text for c in Generator(ep.model, tok).generate(prompts, params)]
        served = {n: s.tokens for n, s in ep.pool.statuses().items()}
    assert got == expected
    if placement == "eplb":
        assert all(served[n] > 0 for n in ("gpu-0", "cpu-fast", "cpu-slow")), served


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["link-cut", "bandwidth-drop"])
def test_link_faults_mid_stream_lose_nothing_and_change_no_output(
    rig, scenario: str, tmp_path: Path
) -> None:
    from expertmesh.chaos.runner import Runner, load_scenario
    from expertmesh.cluster.rig import netns
    from expertmesh.cluster.rig.links import pair_rate_gbps
    from expertmesh.cluster.rig.rig import rig_plan

    spec = load_scenario(ROOT / "examples" / "chaos" / f"{scenario}.yaml").shortened()
    report = Runner(spec, tmp_path / scenario).run()
    assert report.ok > 0 and report.lost == 0 and report.wrong_outputs == 0, report.to_dict()
    plan = rig_plan(rig)  # the link is back as it was
    assert pair_rate_gbps(plan, "gpu-0", "cpu-fast") == pytest.approx(1.0)
    assert "UP" in system.run(["ip", "link", "show", plan.node("cpu-fast").host_veth]).stdout
    assert netns.namespaces("emrig")


@pytest.mark.e2e
@pytest.mark.slow
def test_down_leaves_no_namespace_cgroup_link_or_process(rig) -> None:
    from expertmesh.cluster.rig import cgroups
    from expertmesh.cluster.rig.rig import leftovers, rig_down

    names = list(rig.ray_node_ids)
    pids = set().union(*(cgroups.pids(n) for n in names))
    assert pids
    rig_down()
    assert leftovers() == {"netns": [], "links": [], "cgroups": [], "state": []}
    deadline = time.monotonic() + 10  # killed processes wait for their (new) parent to reap
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes left: {alive}"
    assert rig_down() == {}  # idempotent


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.e2e
def test_down_cleans_a_rig_that_crashed_half_way_up(tmp_path: Path) -> None:
    if not os.environ.get(IN_OWN_PROCESS):
        pytest.skip("runs in its own process (test_the_real_rig_tests_pass_in_their_own_process)")
    reason = _unsupported()
    if reason:
        pytest.skip(reason)
    from expertmesh.cluster.rig import cgroups, netns
    from expertmesh.cluster.rig.rig import default_machine, leftovers, rig_down
    from expertmesh.cluster.rig.state import RigState, state_path

    plan = plan_rig(load_topology(MIXED), default_machine())
    state = RigState(state_path(), plan=plan.to_dict())
    netns.create_bridge(plan, state)
    netns.create_node_netns(plan, plan.nodes[0], state)
    cgroups.create_node_groups(plan.nodes[0], state)
    state.record("netns", name=plan.nodes[1].namespace)  # recorded, the crash came before it
    assert leftovers()["netns"]
    rig_down()
    assert leftovers() == {"netns": [], "links": [], "cgroups": [], "state": []}
