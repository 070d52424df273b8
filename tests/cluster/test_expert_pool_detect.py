"""The pool controller's view of its replicas' dispatch detectors (`cluster/pool_detect.py`):
one incident per fault however many replicas see it; recovered only when the last one does.
The end-to-end case (a slowed shard, replicas' real detectors, the controller's log) is in
tests/cluster/test_expert_pool.py."""

from __future__ import annotations

from expertmesh.cluster.pool_detect import ForwardedEvents, PoolConditions
from expertmesh.observability.events import NODE_SLOW, FaultEvent


class ListSink:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.events.append(event)
        return event


def event(kind: str, target: str = "cpu-fast") -> FaultEvent:
    return FaultEvent(kind, NODE_SLOW, target, source="cluster.dispatch")  # type: ignore[arg-type]


def test_three_replicas_seeing_one_slow_node_make_one_detected_and_one_recovered():
    sink = ListSink()
    conditions = PoolConditions(sink)
    for replica in ("r1", "r2", "r3"):
        conditions.report(replica, event("detected"))
    assert [(e.kind, e.attributes["replica"]) for e in sink.events] == [("detected", "r1")]
    conditions.report("r1", event("recovered"))
    conditions.report("r3", event("recovered"))
    assert len(sink.events) == 1  # r2 still sees it
    conditions.report("r2", event("recovered"))
    assert [(e.kind, e.attributes["replica"]) for e in sink.events] == [
        ("detected", "r1"),
        ("recovered", "r2"),
    ]
    assert conditions.active() == {}


def test_targets_are_apart_and_a_stray_recovery_is_dropped():
    sink = ListSink()
    conditions = PoolConditions(sink)
    conditions.report("r1", event("recovered"))  # never detected: nothing to close
    conditions.report("r1", event("detected", "cpu-fast"))
    conditions.report("r2", event("detected", "cpu-slow"))
    assert [e.target for e in sink.events] == ["cpu-fast", "cpu-slow"]
    conditions.report("r2", event("recovered", "cpu-fast"))  # r2 never saw cpu-fast
    assert len(sink.events) == 2
    assert conditions.active() == {(NODE_SLOW, "cpu-fast"): {"r1"}, (NODE_SLOW, "cpu-slow"): {"r2"}}


def test_a_replica_that_leaves_holds_no_condition_open():
    sink = ListSink()
    conditions = PoolConditions(sink)
    conditions.report("r1", event("detected"))
    conditions.report("r2", event("detected"))
    conditions.forget("r1")
    assert conditions.active() == {(NODE_SLOW, "cpu-fast"): {"r2"}}
    conditions.forget("r2")
    assert conditions.active() == {}
    conditions.report("r3", event("detected"))  # a new incident
    assert [e.kind for e in sink.events] == ["detected", "detected"]


def test_forwarded_events_go_to_the_controller_without_waiting():
    calls = []

    class Method:
        def remote(self, *args):
            calls.append(args)

    class Controller:
        report_event = Method()

    sink = ForwardedEvents(Controller(), "r1")
    e = event("detected")
    assert sink.emit(e) is e
    assert calls == [("r1", e)] and sink.sent == 1
