"""Continuous batching: joins and leaves every step, KV-budget admission, chunked prefill,
cancellation, deadlines, bounded queue; outputs equal one-request-at-a-time generation."""

from __future__ import annotations

import threading
import time

import pytest

from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.serving.engine import ContextTooLong, Overloaded
from expertmesh.serving.scheduler import ContinuousBatcher, SchedulerConfig, SchedulerEvent


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEMO_MODEL_DIR)


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[SchedulerEvent]] = {}
        self.done = threading.Event()

    def sink(self, rid: str):
        def put(event: SchedulerEvent) -> None:
            self.events.setdefault(rid, []).append(event)

        return put

    def text(self, rid: str) -> str:
        return "".join(e.event.text for e in self.events[rid] if e.event is not None)

    def last(self, rid: str) -> SchedulerEvent:
        return self.events[rid][-1]


def run_until_idle(batcher: ContinuousBatcher, max_steps: int = 10_000) -> int:
    steps = 0
    while sum(batcher.counts()) and steps < max_steps:
        batcher.step()
        steps += 1
    return steps


PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:", "A", "Now is the winter"]


def test_outputs_equal_one_request_at_a_time(model, tokenizer):
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 9, 16)]
    expected = [
        Generator(model, tokenizer).generate([p], [sp])[0].text for p, sp in zip(PROMPTS, params)
    ]
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=2, prefill_chunk=4))
    out = Collector()
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        batcher.submit(f"r{i}", tokenizer.encode(p, add_special_tokens=True), sp, out.sink(f"r{i}"))
    run_until_idle(batcher)
    for i in range(len(PROMPTS)):
        assert out.text(f"r{i}") == expected[i]
        assert out.last(f"r{i}").finish_reason == "length"
        assert out.last(f"r{i}").completion_tokens == params[i].max_tokens


def test_requests_join_a_running_batch_and_leave_it(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=4))
    out = Collector()
    ids = tokenizer.encode("ROMEO:", add_special_tokens=True)
    batcher.submit("long", ids, SamplingParams(max_tokens=30, ignore_eos=True), out.sink("long"))
    for _ in range(5):
        batcher.step()
    assert batcher.counts() == (1, 0)
    batcher.submit("short", ids, SamplingParams(max_tokens=3, ignore_eos=True), out.sink("short"))
    batcher.step()
    assert batcher.counts() == (2, 0)  # joined while "long" decodes
    for _ in range(4):
        batcher.step()
    assert out.last("short").finish_reason == "length"
    assert batcher.counts() == (1, 0)  # left; "long" goes on
    assert out.last("long").finish_reason is None
    run_until_idle(batcher)
    assert out.last("long").completion_tokens == 30


def test_kv_budget_holds_requests_back_until_memory_frees(model, tokenizer):
    ids = tokenizer.encode("ROMEO:", add_special_tokens=True)
    need = len(ids) + 8
    batcher = ContinuousBatcher(
        model, tokenizer, SchedulerConfig(num_slots=4, kv_budget_tokens=need + 1)
    )
    out = Collector()
    for rid in ("a", "b"):
        batcher.submit(rid, ids, SamplingParams(max_tokens=8, ignore_eos=True), out.sink(rid))
    batcher.step()
    assert batcher.counts() == (1, 1)  # b waits: its reservation would pass the budget
    run_until_idle(batcher)
    assert out.last("a").completion_tokens == 8 and out.last("b").completion_tokens == 8


def test_long_prompt_prefills_in_chunks_while_others_decode(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=2, prefill_chunk=8))
    out = Collector()
    short = tokenizer.encode("A", add_special_tokens=True)
    batcher.submit("d", short, SamplingParams(max_tokens=40, ignore_eos=True), out.sink("d"))
    batcher.step()
    long_ids = tokenizer.encode("To be, or not to be " * 12, add_special_tokens=True)
    batcher.submit("p", long_ids, SamplingParams(max_tokens=2, ignore_eos=True), out.sink("p"))
    before = len(out.events["d"])
    chunks = -(-len(long_ids) // 8)
    for _ in range(chunks):
        batcher.step()
    assert len(out.events["d"]) - before == chunks  # one decode token per prefill chunk
    assert "p" in out.events  # the long prompt produced its first token after its chunks


def test_cancel_frees_the_slot_at_the_next_step(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=1))
    out = Collector()
    ids = tokenizer.encode("ROMEO:", add_special_tokens=True)
    batcher.submit("x", ids, SamplingParams(max_tokens=100, ignore_eos=True), out.sink("x"))
    batcher.submit("y", ids, SamplingParams(max_tokens=10, ignore_eos=True), out.sink("y"))
    batcher.step()
    assert batcher.counts() == (1, 1)
    batcher.cancel("x")
    batcher.step()
    assert out.last("x").finish_reason == "cancelled"
    assert batcher.cache.lengths.sum() > 0  # y now holds the slot
    run_until_idle(batcher)
    assert out.last("y").finish_reason == "length"
    assert int(batcher.cache.lengths.sum()) == 0


def test_deadline_ends_a_request(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=1))
    out = Collector()
    ids = tokenizer.encode("ROMEO:", add_special_tokens=True)
    batcher.submit(
        "t",
        ids,
        SamplingParams(max_tokens=500, ignore_eos=True),
        out.sink("t"),
        time.monotonic() + 0.05,
    )
    batcher.step()
    time.sleep(0.06)
    batcher.step()
    assert out.last("t").finish_reason == "deadline"
    assert batcher.counts() == (0, 0)


def test_full_queue_is_refused_not_queued(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=1, max_waiting=2))
    ids = [1, 2, 3]
    sink = Collector().sink("z")
    batcher.submit("a", ids, SamplingParams(max_tokens=2), sink)
    batcher.submit("b", ids, SamplingParams(max_tokens=2), sink)
    with pytest.raises(Overloaded) as e:
        batcher.submit("c", ids, SamplingParams(max_tokens=2), sink)
    assert e.value.retry_after_s > 0
    assert batcher.counts() == (0, 2)


def test_request_larger_than_context_names_the_limit(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(max_len=64))
    with pytest.raises(ContextTooLong, match="maximum context length is 64 tokens"):
        batcher.submit("big", list(range(1, 40)), SamplingParams(max_tokens=30), lambda e: None)


def test_engine_thread_serves_and_reports_a_stall(model, tokenizer):
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(stall_after_s=0.2))
    batcher.start()
    try:
        out = Collector()
        done = threading.Event()

        def sink(event: SchedulerEvent) -> None:
            out.sink("s")(event)
            if event.finish_reason is not None:
                done.set()

        batcher.submit("s", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), sink)
        assert done.wait(30)
        assert not batcher.stalled()
        batcher.step_hook = lambda: time.sleep(1.0)  # a hung step
        batcher.submit(
            "h", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), lambda e: None
        )
        time.sleep(0.6)
        assert batcher.stalled()
    finally:
        batcher.step_hook = None
        batcher.stop()


class _CountingObserver:
    """Router statistics over a whole run (EngineMetrics resets them every step)."""

    def __init__(self, config) -> None:
        from expertmesh.models.router_stats import RouterStats

        self.stats = RouterStats(config, keep_last=True)

    def after_step(self, *_: object) -> None:
        pass

    def forget(self, _: str) -> None:
        pass


def test_prompts_of_different_lengths_prefill_in_one_padded_pass(model, tokenizer):
    # 6, 8, 10 and 11 tokens: each longer than half the longest, so one pass pads them to 11
    prompts = ["ROMEO:", "To be, or not to be", "JULIET: O Romeo, Romeo!", "KING LEAR: Blow, winds"]
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    expected = [Generator(model, tokenizer).generate([p], [params])[0].text for p in prompts]
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=4))
    batcher.observer = _CountingObserver(model.config)
    out = Collector()
    for i, x in enumerate(ids):
        batcher.submit(f"r{i}", x, params, out.sink(f"r{i}"))
    batcher.step()
    width = max(len(x) for x in ids)
    assert batcher.stats.prefill_forwards == 1
    assert batcher.stats.prefill_padding == sum(width - len(x) for x in ids) > 0
    slots = {r.request_id: r.slot for r in batcher._running}
    for i, x in enumerate(ids):  # the real prompt and the first fed token, not the padding
        assert int(batcher.cache.lengths[slots[f"r{i}"]]) == len(x) + 1
    run_until_idle(batcher)
    for i in range(len(prompts)):
        assert out.text(f"r{i}") == expected[i]
        assert out.last(f"r{i}").completion_tokens == params.max_tokens
    fed = sum(len(x) + params.max_tokens - 1 for x in ids)  # the last token is never fed
    top_k = model.config.moe.top_k
    for layer in model.config.moe_layer_ids:  # the padding is not counted as routed tokens
        assert int(batcher.observer.stats.tokens[layer].sum()) == fed * top_k


def test_a_chunk_under_half_the_longest_waits_for_the_next_pass(model, tokenizer):
    short, long = "A", "Now is the winter of our discontent"  # 2-3 tokens against 10
    batcher = ContinuousBatcher(model, tokenizer, SchedulerConfig(num_slots=2))
    out = Collector()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for rid, p in (("short", short), ("long", long)):
        batcher.submit(rid, tokenizer.encode(p, add_special_tokens=True), params, out.sink(rid))
    batcher.step()
    assert batcher.stats.prefill_forwards == 1 and batcher.stats.prefill_padding == 0
    assert "long" in out.events and "short" not in out.events
    batcher.step()
    assert batcher.stats.prefill_forwards == 2 and "short" in out.events
    run_until_idle(batcher)
    expected = Generator(model, tokenizer).generate([short], [params])[0].text
    assert out.text("short") == expected
