"""Our C++ kernels and threads: they let go of the GIL while they compute, as torch's own ops do
(a serving replica runs the model on its engine thread and its HTTP event loops on others, and
a kernel that kept the GIL would stop every stream for the whole call, about 20 ms of each
batch-32 decode step); and their threads take tasks as they go (`native.parallel_tasks`), each
task once, with the same sums whatever the number of threads."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from expertmesh.models import decode_kernel, moe_kernel

CALLS = 3


def python_progress_during(call: Callable[[], object]) -> tuple[float, float]:
    """Run `call` CALLS times on a worker thread with one intra-op thread, counting on this
    thread meanwhile: (the shortest call, this thread's longest stall while a call ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a core left for this thread on a two-core machine
    spans: list[tuple[float, float]] = []
    done = threading.Event()

    def work() -> None:
        try:
            for _ in range(CALLS):
                start = time.perf_counter()
                call()
                spans.append((start, time.perf_counter()))
        finally:
            done.set()

    try:
        call()  # warm: first-touch page faults and the thread pool
        stamps = [time.perf_counter()]
        worker = threading.Thread(target=work)
        worker.start()
        while not done.is_set():
            stamps.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
    stall = 0.0
    for start, end in spans:
        inside = [start] + [s for s in stamps if start < s < end] + [end]
        stall = max(stall, max(b - a for a, b in itertools.pairwise(inside)))
    return min(end - start for start, end in spans), stall


def assert_other_threads_ran(call: Callable[[], object]) -> None:
    shortest, stall = python_progress_during(call)
    assert shortest > 0.02, f"the call took {shortest * 1e3:.1f} ms: too short to tell"
    # Held, the GIL would stall this thread for a whole call.
    assert stall < 0.5 * shortest, (
        f"this thread stalled {stall * 1e3:.1f} ms during a {shortest * 1e3:.1f} ms kernel call"
    )


@pytest.mark.skipif(
    not decode_kernel.available(),
    reason=f"decode kernel not built here: {decode_kernel.unavailable_reason()}",
)
def test_the_dense_linear_kernel_releases_the_gil() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1024, generator=gen)
    weight = torch.randn(24576, 1024, generator=gen)  # 96 MB: tens of ms on one core
    assert_other_threads_ran(lambda: decode_kernel.few_rows_linear(x, weight))


@pytest.mark.skipif(
    not moe_kernel.available(),
    reason=f"MoE CPU kernel not built here: {moe_kernel.unavailable_reason()}",
)
def test_the_expert_kernel_releases_the_gil() -> None:
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, per_expert = 24, 1024, 1024, 8
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02  # 192 MB
    down = torch.randn(experts, hidden, inter, generator=gen) * 0.02
    xs = torch.randn(experts * per_expert, hidden, generator=gen)
    counts, slots = [per_expert] * experts, list(range(experts))
    assert_other_threads_ran(lambda: moe_kernel.expert_mlp(xs, counts, slots, gate_up, down))


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(
    not (decode_kernel.available() and moe_kernel.available()),
    reason=f"kernels not built here: {decode_kernel.unavailable_reason()}, "
    f"{moe_kernel.unavailable_reason()}",
)
def test_every_task_runs_once_with_the_same_sums_on_any_number_of_threads() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    weight = torch.randn(1003, 64, generator=gen)  # 126 blocks of 8 rows, the last short
    experts, hidden, inter = 7, 64, 32
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen)
    down = torch.randn(experts, hidden, inter, generator=gen)
    counts, slots = [3, 1, 8, 2, 5, 4, 6], [6, 0, 5, 1, 4, 2, 3]
    xs = torch.randn(sum(counts), hidden, generator=gen)
    runs = []
    for threads in (1, 2, 3, 4):
        with intra_op_threads(threads), torch.inference_mode():
            linear = decode_kernel.few_rows_linear(x, weight, block=8)
            expert = moe_kernel.expert_mlp(xs, counts, slots, gate_up, down, block=8)
        runs.append((linear, expert))
    torch.testing.assert_close(runs[0][0], torch.nn.functional.linear(x, weight))
    for linear, expert in runs[1:]:
        assert torch.equal(linear, runs[0][0])
        assert torch.equal(expert, runs[0][1])
