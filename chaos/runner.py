"""Fault injection: YAML scenarios run against the embedded platform under load.

    expertmesh chaos run examples/chaos/kill-shard.yaml [--short] [--out DIR]

The runner starts the platform the way `expertmesh up --topology T` does (embedded Ray cluster,
expert shards, the serving engine with its scheduler, the selector with a policy, the
supervisor), drives it with concurrent greedy requests through the HTTP API (in-process ASGI
transport), injects the scenario's faults on schedule, and checks its expectations: requests
lost (accepted but not answered correctly), outputs equal to a fault-free run, time from each
fault to recovery, and that the platform detected every fault within `expect.detect_within_s`.
Spans, metrics and fault events land in `--out` for `expertmesh fmea`.

The injector only injects: it emits `fault` when it breaks something and `restored` when it
stops (`source: chaos`). Every `detected` and `recovered` comes from the platform's own
detectors (the supervisor, `cluster/detect.py` on dispatch replies, the engine's KV pressure,
the budget ledger's lock and budget watch, policy validation, the head watch's GCS probe);
a fault without a platform detection
within the deadline fails the run. `control=True` runs the same load for the same length with
no fault: every detection then is a false positive (`ChaosReport.false_positives`).

Fault kinds: kill_actor, kill_node (with `restore_after_s`, the node comes back and must
rejoin), drain_node, slow_node, link_latency, skew_router, corrupt_weights, fill_kv_cache,
break_policy, lock_budget_db; stall_engine, spend_budget, hang_head (`chaos/control_faults.py`);
on the rig, link_cut and bandwidth_drop (`chaos/rig_faults.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from expertmesh.observability.events import (
    BAD_POLICY,
    BUDGET_DB_LOCKED,
    CHAOS,
    EXPERT_SHARD_LOST,
    KV_CACHE_EXHAUSTED,
    LINK_DEGRADED,
    NODE_DRAINED,
    NODE_LOST,
    NODE_SLOW,
    ROUTER_IMBALANCE,
    WEIGHTS_CORRUPT,
    EventLog,
    FaultEvent,
    SourcedEvents,
    read_events,
)

from .control_faults import CONTROL_FAULT_MODES, CONTROL_FAULTS
from .control_faults import inject as inject_control
from .rig_faults import RIG_FAULT_MODES, RIG_FAULTS, inject

FaultKind = Literal[
    "link_cut",  # rig only (chaos/rig_faults.py)
    "bandwidth_drop",  # rig only
    "kill_actor",
    "kill_node",
    "drain_node",
    "slow_node",
    "link_latency",
    "skew_router",
    "corrupt_weights",
    "fill_kv_cache",
    "break_policy",
    "lock_budget_db",
    "stall_engine",  # chaos/control_faults.py
    "spend_budget",
    "hang_head",
]
MODE_OF: dict[str, str] = {
    **RIG_FAULT_MODES,  # chaos/rig_faults.py
    **CONTROL_FAULT_MODES,  # chaos/control_faults.py
    "kill_actor": EXPERT_SHARD_LOST,
    "kill_node": NODE_LOST,
    "drain_node": NODE_DRAINED,
    "slow_node": NODE_SLOW,
    "link_latency": LINK_DEGRADED,
    "skew_router": ROUTER_IMBALANCE,
    "corrupt_weights": WEIGHTS_CORRUPT,
    "fill_kv_cache": KV_CACHE_EXHAUSTED,
    "break_policy": BAD_POLICY,
    "lock_budget_db": BUDGET_DB_LOCKED,
}
STALL_AFTER_S = 2.0
"""The chaos platform's engine-stall threshold (production's default is 30 s,
`serving/config.py`): a step of the demo model takes milliseconds, and the scenarios last
seconds."""
PROMPT = "ROMEO:"
MAX_TOKENS = 8


class ChaosError(ValueError):
    """A scenario file is invalid (the message names the field)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaultSpec(_Spec):
    kind: FaultKind
    at_s: Annotated[float, Field(ge=0)] = 1.0
    target: str | None = None
    """Node name for node and actor faults."""
    repeat: Annotated[int, Field(ge=1)] = 1
    every_s: Annotated[float, Field(gt=0)] = 2.0
    duration_s: Annotated[float, Field(gt=0)] = 2.0
    """How long a transient fault lasts (slow node, link latency, lock, skew)."""
    factor: Annotated[float, Field(gt=0)] = 4.0
    """slow_node: compute slowdown factor; link_latency: added latency in ms."""
    restore_after_s: Annotated[float, Field(gt=0)] | None = None
    """kill_node: the node comes back this long after (KubeRay recreating its pod)."""

    @model_validator(mode="after")
    def _restore_only_for_kill_node(self) -> FaultSpec:
        if self.restore_after_s is not None and self.kind != "kill_node":
            raise ValueError(f"restore_after_s is for kill_node faults, not {self.kind}")
        return self


class LoadSpec(_Spec):
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    duration_s: Annotated[float, Field(gt=0)] = 8.0


class ExpectSpec(_Spec):
    lost_requests: Annotated[int, Field(ge=0)] = 0
    outputs_equal: bool = True
    recovery_s: Annotated[float, Field(gt=0)] | None = None
    """Every fault's failure mode recovered within this many seconds (from events)."""
    detected: list[str] = []
    """Failure modes (besides each fault's own) that the platform must detect."""
    detect_within_s: Annotated[float, Field(gt=0)] = 5.0
    """Every fault's failure mode detected by the platform within this many seconds of the
    fault, or the run fails."""
    rejected_ok: bool = False
    """429 answers (bounded queue, budgets) are expected and are not lost requests."""
    rejoined: list[str] = []
    """Nodes that must be back in service by the end (the supervisor's `rejoined` action)."""


class Scenario(_Spec):
    name: str
    description: str = ""
    topology: str = "examples/topologies/mixed.yaml"
    rig: bool = False
    """Run on the rig (real links and CPU quotas, `chaos/rig_faults.py`), not the embedded one."""
    load: LoadSpec = LoadSpec()
    faults: list[FaultSpec] = Field(min_length=1)
    expect: ExpectSpec = ExpectSpec()

    def shortened(self) -> Scenario:
        """The test-suite version: shorter load, faults sooner, fewer repeats. Faults still
        wait 2 s: the dispatch detectors judge against a baseline of the node's own replies."""
        load = self.load.model_copy(update={"duration_s": min(self.load.duration_s, 6.0)})
        faults = [
            f.model_copy(update={"at_s": min(f.at_s, 2.0), "repeat": min(f.repeat, 2)})
            for f in self.faults
        ]
        return self.model_copy(update={"load": load, "faults": faults})


def load_scenario(path: str | Path) -> Scenario:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ChaosError(f"cannot read scenario {path}: {e}") from e
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ChaosError(f"scenario {path} is invalid:\n" + "\n".join(lines)) from None


@dataclass
class RequestResult:
    started: float
    latency_s: float
    status: int
    text: str | None


@dataclass
class ChaosReport:
    scenario: str
    requests: int
    ok: int
    rejected: int
    lost: int
    wrong_outputs: int
    recovery_s: dict[str, list[float]]
    detected: list[str]
    """Failure modes the platform detected."""
    time_to_detect_s: dict[str, list[float]] = field(default_factory=dict)
    """Per fault's mode: seconds from each fault to the platform's first detection after it."""
    false_positives: list[str] = field(default_factory=list)
    """Platform detections that follow no fault of their mode ("mode@target by source")."""
    control: bool = False
    """A fault-free run (the same load, no injection)."""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


class Platform:
    """The embedded platform in this process: cluster, engine, selector, API, supervisor."""

    def __init__(self, scenario: Scenario, out: Path, root: Path, trace: Any = None) -> None:
        from expertmesh.cluster.runtime import ExpertParallelModel
        from expertmesh.cluster.topology import load_topology
        from expertmesh.models.paths import DEMO_MODEL_DIR
        from expertmesh.models.tokenizer import Tokenizer
        from expertmesh.observability import TelemetryConfig, configure_telemetry
        from expertmesh.observability.fault_metrics import MeteredEvents
        from expertmesh.serving.api import make_api
        from expertmesh.serving.config import SupervisorSpec
        from expertmesh.serving.gate import SelectorGate
        from expertmesh.serving.local_engine import ExpertMeshEngine
        from expertmesh.serving.scheduler import SchedulerConfig

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        for name in ("spans.jsonl", "metrics.jsonl", "events.jsonl"):
            (out / name).unlink(missing_ok=True)
        self.checkpoint = out / "checkpoint"  # a private copy: faults may corrupt it
        if self.checkpoint.exists():
            shutil.rmtree(self.checkpoint)
        shutil.copytree(DEMO_MODEL_DIR, self.checkpoint)
        self.policy = out / "policy.yaml"
        shutil.copy(root / "examples" / "policies" / "chaos.yaml", self.policy)
        self.ledger = out / "budget.sqlite"
        self.ledger.unlink(missing_ok=True)
        self.telemetry = configure_telemetry(
            TelemetryConfig(
                exporter="jsonl",
                jsonl_path=out / "spans.jsonl",
                metrics_exporter="jsonl",
                metrics_jsonl_path=out / "metrics.jsonl",
                metrics_export_interval_s=1.0,
            )
        )
        self.events = EventLog(out / "events.jsonl", scenario=scenario.name)
        self.topology = load_topology(root / scenario.topology)
        tracer = self.telemetry.tracer
        if scenario.rig:
            from .rig_faults import launch

            self.topology, self.ep = launch(self.checkpoint, tracer)
        else:
            # Planned for the load it will get (`trace`: its expert load), as production
            # plans from a routing trace: the first rebalance then has nothing to correct.
            self.ep = ExpertParallelModel.launch(
                self.checkpoint, self.topology, trace=trace, tracer=tracer
            )
        self.engine = ExpertMeshEngine(
            "expertmesh-demo",
            self.ep.model,
            Tokenizer.from_dir(self.checkpoint),
            SchedulerConfig(num_slots=8, max_waiting=16, stall_after_s=STALL_AFTER_S),
            owner=self.ep,
            tracer=tracer,
            meter=self.telemetry.meter,
        )

        # The gate as production builds it (`serving/app.py` build_gate): its detectors (bad
        # policy, ledger locked, budget exhausted) report to the run's events and metrics.
        self.gate = SelectorGate.from_policy_file(
            self.policy,
            self.engine,
            self.ledger,
            tracer=tracer,
            events=MeteredEvents(self.events, self.telemetry.meter),
            check_interval_s=0.2,
        )
        self.app = make_api(self.engine, gate=self.gate, meter=self.telemetry.meter, tracer=tracer)
        spec = SupervisorSpec(  # on the rig the placement is held (rig_faults.py says why)
            rebalance_every_s=0.0 if scenario.rig else 1.0,
            rebalance_threshold=1.2,
            rebalance_min_tokens=64,
        )
        self.supervisor = self.engine.supervise(
            self.ep, self.topology, spec, tracer=tracer, events=self.events
        )
        import ray

        from expertmesh.cluster.head_watch import SOURCE as HEAD_SOURCE
        from expertmesh.cluster.head_watch import HeadWatch

        self.head_watch = HeadWatch(
            SourcedEvents(self.events, HEAD_SOURCE), ray.get_runtime_context().gcs_address
        ).start()

    def close(self) -> None:
        self.head_watch.stop()
        self.supervisor.stop()
        asyncio.run(self.engine.shutdown())
        self.events.close()
        self.telemetry.shutdown()


class Runner:
    def __init__(
        self, scenario: Scenario, out: Path, root: Path | None = None, control: bool = False
    ) -> None:
        self.scenario = scenario
        self.control = control
        """Run the load without injecting anything (false-positive count)."""
        self.out = out
        self.root = root or Path(__file__).resolve().parents[1]
        self.results: list[RequestResult] = []
        self.expected: str | None = None
        self.trace: Any = None

    def run(self) -> ChaosReport:
        from expertmesh.models.checkpoint import load_model
        from expertmesh.models.generate import Generator, SamplingParams
        from expertmesh.models.paths import DEMO_MODEL_DIR
        from expertmesh.models.router_stats import RouterStats
        from expertmesh.models.tokenizer import Tokenizer

        model = load_model(DEMO_MODEL_DIR)
        routed = RouterStats(model.config)
        gen = Generator(model, Tokenizer.from_dir(DEMO_MODEL_DIR), router_stats=routed)
        prompt = Tokenizer.from_dir(DEMO_MODEL_DIR).apply_chat_template(
            [{"role": "user", "content": PROMPT}]
        )
        self.expected = gen.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS))[0].text
        self.trace = routed.tokens[list(model.config.moe_layer_ids)].double().numpy() + 1.0
        """The load's expert load per MoE layer (the placement is planned for it)."""
        from .rig_faults import on_rig

        with on_rig(self.scenario, self.root):
            return self._run()

    def _run(self) -> ChaosReport:
        platform = Platform(self.scenario, self.out, self.root, self.trace)
        try:
            # Load on a thread, faults on this one: starting a Ray node (a node coming back)
            # installs signal handlers, which only the main thread may do.
            load = threading.Thread(
                target=lambda: asyncio.run(self._load(platform)), name="chaos-load", daemon=True
            )
            self._t0 = time.monotonic()
            load.start()
            if self.control:
                time.sleep(self._fault_run_s())
            else:
                self._inject(platform)
            load.join(self.scenario.load.duration_s + 120)
            if not self.control:
                self._settle(platform)
        finally:
            platform.close()
        return self._report()

    # ----------------------------------------------------------------- load

    async def _load(self, platform: Platform) -> None:
        import httpx

        spec = self.scenario.load
        transport = httpx.ASGITransport(app=platform.app)
        deadline = time.monotonic() + spec.duration_s
        async with httpx.AsyncClient(
            transport=transport, base_url="http://chaos", timeout=120
        ) as c:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self._one(c)

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))

    async def _one(self, client: Any) -> None:
        body = {
            "model": "expertmesh-demo",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        t0 = time.monotonic()
        try:
            r = await client.post(
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": "Bearer sk-expertmesh-dev"},
            )
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            status = r.status_code
        except Exception:
            status, text = 599, None
        self.results.append(RequestResult(t0, time.monotonic() - t0, status, text))
        if status == 429:
            await asyncio.sleep(0.2)

    # ----------------------------------------------------------------- faults

    def _inject(self, platform: Platform) -> None:
        plan = sorted(
            ((f.at_s + i * f.every_s, f) for f in self.scenario.faults for i in range(f.repeat)),
            key=lambda x: x[0],
        )
        for at, fault in plan:
            delay = self._t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._emit(platform, "fault", fault, fault.kind)
            if fault.kind in RIG_FAULTS:
                inject(platform, fault, self.scenario.name)
                continue
            if fault.kind in CONTROL_FAULTS:
                self._emit(platform, "restored", fault, inject_control(platform, fault))
                continue
            getattr(self, f"_fault_{fault.kind}")(platform, fault)

    def _emit(self, p: Platform, kind: str, fault: FaultSpec, detail: str) -> None:
        """The injector's only events: `fault` and `restored`, source chaos."""
        p.events.emit(
            FaultEvent(
                kind,  # type: ignore[arg-type]
                MODE_OF[fault.kind],
                target=fault.target or fault.kind,
                scenario=self.scenario.name,
                detail=detail,
                source=CHAOS,
            )
        )

    def _fault_run_s(self) -> float:
        """How long the faulted run of this scenario injects for: its last fault plus the
        detection deadline (a control run lasts as long)."""
        last = max(
            f.at_s + (f.repeat - 1) * f.every_s + f.duration_s + (f.restore_after_s or 0.0)
            for f in self.scenario.faults
        )
        return max(self.scenario.load.duration_s, last + self.scenario.expect.detect_within_s)

    def _fault_kill_actor(self, p: Platform, f: FaultSpec) -> None:
        p.ep.pool.kill(f.target or "gpu-0")  # type: ignore[attr-defined]

    def _fault_kill_node(self, p: Platform, f: FaultSpec) -> None:
        node = f.target or "cpu-slow"
        p.ep.cluster.remove_node(node)
        if f.restore_after_s is not None:
            time.sleep(f.restore_after_s)
            p.ep.cluster.add_node(node)

    def _fault_drain_node(self, p: Platform, f: FaultSpec) -> None:
        p.supervisor.drain(f.target or "cpu-fast")

    def _emulate(self, p: Platform, node: str, slowdown: float, extra_latency_us: float) -> None:
        import ray

        from expertmesh.cluster.local import emulation_for

        base = emulation_for(p.topology)[node]
        changed = type(base)(
            slowdown=base.slowdown * slowdown,
            link_gbps=base.link_gbps,
            link_latency_us=base.link_latency_us + extra_latency_us,
        )
        ray.get(p.ep.pool.handles[node].set_emulation.remote(changed))  # type: ignore[attr-defined]

    def _transient(self, p: Platform, f: FaultSpec, slowdown: float, latency_us: float) -> None:
        node = f.target or "cpu-fast"
        self._emulate(p, node, slowdown, latency_us)
        time.sleep(f.duration_s)
        self._emulate(p, node, 1.0, 0.0)
        self._emit(p, "restored", f, "emulation back to the topology's")

    def _fault_slow_node(self, p: Platform, f: FaultSpec) -> None:
        self._transient(p, f, f.factor, 0.0)

    def _fault_link_latency(self, p: Platform, f: FaultSpec) -> None:
        self._transient(p, f, 1.0, f.factor * 1000.0)

    def _fault_skew_router(self, p: Platform, f: FaultSpec) -> None:
        """Skewed traffic through the API for `duration_s`: one repeated word, so a few
        experts of every layer get most tokens (the engine serialises it with the load)."""
        body = {"model": "expertmesh-demo", "prompt": "Ay " * 32, "max_tokens": 4}

        async def skewed() -> None:
            import httpx

            transport = httpx.ASGITransport(app=p.app)
            end = time.monotonic() + f.duration_s
            async with httpx.AsyncClient(
                transport=transport, base_url="http://c", timeout=120
            ) as c:

                async def one() -> None:
                    while time.monotonic() < end:
                        await c.post(
                            "/v1/completions",
                            json=body,
                            headers={"Authorization": "Bearer sk-expertmesh-dev"},
                        )

                await asyncio.gather(*(one() for _ in range(4)))

        asyncio.run(skewed())
        self._emit(p, "restored", f, "skewed traffic stopped")

    def _fault_corrupt_weights(self, p: Platform, f: FaultSpec) -> None:
        """Corrupt the checkpoint's header, then load a new replica from it (what a rebalance
        or a restart does): the load fails loudly, nothing is swapped, serving continues
        from the weights already in memory."""
        weights = next(p.checkpoint.glob("*.safetensors"))
        good = weights.read_bytes()
        data = bytearray(good)
        data[8:64] = b"\xff" * 56  # inside the JSON header
        weights.write_bytes(bytes(data))
        node = f.target or "cpu-fast"
        layer = p.ep.config.moe_layer_ids[0]
        held = set(p.ep.dispatcher.table.node_experts().get(node, {}).get(layer, []))
        missing = [e for e in range(p.ep.config.moe.num_experts) if e not in held][:1] or [0]
        # The supervisor loads the replica, as a rebalance or a restart would: it fails (the
        # supervisor reports it) and serving goes on from the weights in memory.
        with contextlib.suppress(Exception):
            p.supervisor.load_replicas({node: {layer: missing}})
        weights.write_bytes(good)
        self._emit(p, "restored", f, "weights file restored")

    def _fault_fill_kv_cache(self, p: Platform, f: FaultSpec) -> None:
        async def burst() -> list[int]:
            import httpx

            transport = httpx.ASGITransport(app=p.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://c", timeout=120
            ) as c:
                body = {"model": "expertmesh-demo", "prompt": "ROMEO: " * 200, "max_tokens": 64}
                rs = await asyncio.gather(
                    *(
                        c.post(
                            "/v1/completions",
                            json=body,
                            headers={"Authorization": "Bearer sk-expertmesh-dev"},
                        )
                        for _ in range(40)
                    )
                )
                return [r.status_code for r in rs]

        codes = asyncio.run(burst())
        self._emit(p, "restored", f, f"burst over: {codes.count(429)} of {len(codes)} got 429")

    def _fault_break_policy(self, p: Platform, f: FaultSpec) -> None:
        good = p.policy.read_text()
        p.policy.write_text("version: 1\nname: broken\nmodels: [oops\n")
        time.sleep(f.duration_s)
        p.policy.write_text(good)
        self._emit(p, "restored", f, "policy file restored")

    def _fault_lock_budget_db(self, p: Platform, f: FaultSpec) -> None:
        conn = sqlite3.connect(p.ledger, timeout=5)
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(f.duration_s)
        conn.rollback()
        conn.close()
        self._emit(p, "restored", f, "lock released")

    def _settle(self, platform: Platform) -> None:
        """Keep the platform up until every injected fault has recovered, or until the
        scenario's recovery bound (10 s without one) has passed since the last fault: the load
        may end before a slow recovery does, and stopping then would report it as never
        recovered. A node expected to rejoin gets 30 s from its return (a new shard process
        starts)."""
        expect = self.scenario.expect
        bound = max(expect.recovery_s or 10.0, 30.0 if expect.rejoined else 0.0)
        last_fault = max(
            self._t0 + f.at_s + (f.repeat - 1) * f.every_s + (f.restore_after_s or 0.0)
            for f in self.scenario.faults
        )
        deadline = max(time.monotonic() + 0.5, last_fault + bound + 0.5)
        while time.monotonic() < deadline:
            events = read_events(self.out / "events.jsonl")
            _, undetected, _ = detections(events, float("inf"))
            unrecovered = _recoveries(events)[1] if expect.recovery_s is not None else set()
            if not undetected and not unrecovered and set(expect.rejoined) <= _rejoined(events):
                time.sleep(0.5)  # let the supervisor finish reporting
                return
            time.sleep(0.2)

    # ----------------------------------------------------------------- verdict

    def _report(self) -> ChaosReport:
        expect = self.scenario.expect
        rejected = sum(1 for r in self.results if r.status == 429)
        ok = [r for r in self.results if r.status == 200]
        lost = sum(1 for r in self.results if r.status not in (200, 429))
        if not expect.rejected_ok:
            lost += rejected
        wrong = sum(1 for r in ok if r.text != self.expected)
        events = read_events(self.out / "events.jsonl")
        recovery, unrecovered = _recoveries(events)
        detected = sorted(
            {e.failure_mode for e in events if e.kind == "detected" and e.from_platform}
        )
        ttd, undetected, false_positives = detections(events, expect.detect_within_s)
        report = ChaosReport(
            self.scenario.name,
            len(self.results),
            len(ok),
            rejected,
            lost,
            wrong,
            recovery,
            detected,
            ttd,
            false_positives,
            self.control,
        )
        for miss in undetected:
            report.failures.append(miss)
        if lost > expect.lost_requests:
            report.failures.append(f"{lost} requests lost (allowed {expect.lost_requests})")
        if expect.outputs_equal and wrong:
            report.failures.append(f"{wrong} outputs differ from the fault-free run")
        if not ok:
            report.failures.append("no request succeeded")
        for mode in [] if self.control else expect.detected:
            if mode not in detected:
                report.failures.append(f"failure mode {mode} was never detected")
        for node in sorted(set([] if self.control else expect.rejoined) - _rejoined(events)):
            report.failures.append(f"node {node} never rejoined")
        if expect.recovery_s is not None:
            for mode, times in recovery.items():
                if max(times) > expect.recovery_s:
                    report.failures.append(
                        f"{mode}: recovery took {max(times):.2f} s > {expect.recovery_s} s"
                    )
            if unrecovered:
                report.failures.append(f"never recovered: {sorted(unrecovered)}")
        (self.out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        return report


NODE_MODES = frozenset({LINK_DEGRADED, NODE_SLOW, EXPERT_SHARD_LOST, NODE_LOST, NODE_DRAINED})
"""Failure modes of one node: their detection must name the faulted node (a slow link blamed
on another node is a wrong detection, not a detection)."""


def detections(
    events: list[FaultEvent], within_s: float
) -> tuple[dict[str, list[float]], list[str], list[str]]:
    """Each fault's time to detect: the first platform `detected` of its mode after it (each
    detection answers one fault, in order; for a node's mode, `NODE_MODES`, one naming that
    node). Returns the times per mode, a failure line per fault not detected within
    `within_s` and per detection that named another node while the fault lasted, and the
    platform detections that answered no fault (false positives, "mode@target by source")."""
    ordered = sorted(events, key=lambda e: e.time_unix_nano)
    faults = [e for e in ordered if e.kind == "fault" and not e.from_platform]
    found = [e for e in ordered if e.kind == "detected" and e.from_platform]
    restored = [e for e in ordered if e.kind == "restored" and not e.from_platform]
    end = ordered[-1].time_unix_nano if ordered else 0
    lasts: list[tuple[int, int]] = []
    """Each fault's (start, restored or the end of the run)."""
    for f in faults:
        until = next(
            (
                r.time_unix_nano
                for r in restored
                if r.failure_mode == f.failure_mode
                and r.target == f.target
                and r.time_unix_nano >= f.time_unix_nano
            ),
            end,
        )
        lasts.append((f.time_unix_nano, until))
    used: set[int] = set()
    ttd: dict[str, list[float]] = {}
    misses: list[str] = []
    for fault in faults:
        node_mode = fault.failure_mode in NODE_MODES
        match = next(
            (
                i
                for i, d in enumerate(found)
                if i not in used
                and d.failure_mode == fault.failure_mode
                and d.time_unix_nano >= fault.time_unix_nano
                and (not node_mode or d.target == fault.target)
            ),
            None,
        )
        waited = (
            (found[match].time_unix_nano - fault.time_unix_nano) / 1e9
            if match is not None
            else None
        )
        if match is not None:
            used.add(match)
            ttd.setdefault(fault.failure_mode, []).append(waited)  # type: ignore[arg-type]
        if waited is None or waited > within_s:
            how = "never" if waited is None else f"only after {waited:.2f} s"
            misses.append(
                f"{fault.failure_mode} fault on {fault.target} ({fault.detail}): the platform "
                f"detected it {how} (deadline {within_s:g} s)"
            )
    # A node's mode detected on a node that has no fault of that mode then: the wrong node.
    for i, d in enumerate(found):
        if d.failure_mode not in NODE_MODES:
            continue
        during = [
            f
            for f, (a, b) in zip(faults, lasts, strict=True)
            if f.failure_mode == d.failure_mode and a <= d.time_unix_nano <= b
        ]
        if during and d.target not in {f.target for f in during}:
            used.add(i)  # a failure already: not counted again as a false positive
            at = (d.time_unix_nano - during[0].time_unix_nano) / 1e9
            misses.append(
                f"{d.failure_mode} fault on {', '.join(sorted({f.target for f in during}))}: "
                f"the platform named the wrong node, {d.target} ({d.source}, +{at:.2f} s: "
                f"{d.detail})"
            )
    # The rest: a detection while a fault lasts (until it is restored, or the end of the run,
    # plus the deadline) is that fault seen again or its consequence (a drain leaves the
    # load imbalanced); one outside every fault's window answers nothing: a false positive.
    windows = [(a, b + int(min(within_s, 1e6) * 1e9)) for a, b in lasts]
    false_positives = [
        f"{d.failure_mode}@{d.target} by {d.source or 'unknown'}"
        for i, d in enumerate(found)
        if i not in used and not any(a <= d.time_unix_nano <= b for a, b in windows)
    ]
    secondary = [
        f"{d.failure_mode}@{d.target} by {d.source or 'unknown'}"
        for i, d in enumerate(found)
        if i not in used and d.failure_mode not in {f.failure_mode for f in faults}
    ]
    false_positives += [f"(during a fault) {x}" for x in secondary if x not in false_positives]
    return ttd, misses, false_positives


def _recoveries(events: list[FaultEvent]) -> tuple[dict[str, list[float]], set[str]]:
    """Seconds from each fault to the next recovery of its mode, and the modes with a fault
    not recovered yet."""
    faults: dict[str, list[int]] = {}
    recovery: dict[str, list[float]] = {}
    for e in events:
        if e.kind == "fault":
            faults.setdefault(e.failure_mode, []).append(e.time_unix_nano)
        elif e.kind == "recovered" and faults.get(e.failure_mode):
            start = faults[e.failure_mode].pop(0)
            recovery.setdefault(e.failure_mode, []).append((e.time_unix_nano - start) / 1e9)
    return recovery, {m for m, starts in faults.items() if starts}


def _rejoined(events: list[FaultEvent]) -> set[str]:
    return {e.target for e in events if e.kind == "action" and e.detail.startswith("rejoined")}
