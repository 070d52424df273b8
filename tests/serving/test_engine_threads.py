"""The engine thread sets torch's thread count itself: Ray gives a replica that reserves no
CPUs OMP_NUM_THREADS=1, which would otherwise run the model on one core."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.serving.config import SchedulerSpec
from expertmesh.serving.scheduler import ContinuousBatcher, SchedulerConfig


def _threads_seen_by_the_engine(config: SchedulerConfig) -> int:
    model = load_model(DEMO_MODEL_DIR)
    batcher = ContinuousBatcher(model, Tokenizer.from_dir(DEMO_MODEL_DIR), config)
    seen: list[int] = []
    ran = threading.Event()

    def hook() -> None:
        seen.append(torch.get_num_threads())
        ran.set()

    batcher.step_hook = hook
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what Ray's OMP_NUM_THREADS=1 gives the replica
    try:
        batcher.start()
        batcher.submit("r", [1, 2, 3], _params(), lambda event: None)
        assert ran.wait(30), "the engine thread never stepped"
    finally:
        batcher.stop()
        torch.set_num_threads(before)
    return seen[0]


def _params():
    from expertmesh.models.generate import SamplingParams

    return SamplingParams(max_tokens=1, ignore_eos=True)


def test_engine_thread_uses_every_cpu_by_default() -> None:
    assert _threads_seen_by_the_engine(SchedulerConfig()) == len(os.sched_getaffinity(0))


def test_engine_thread_uses_the_configured_threads() -> None:
    assert _threads_seen_by_the_engine(SchedulerSpec(threads=1).build()) == 1


def test_threads_below_one_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"scheduler\.threads"):
        SchedulerConfig(threads=0)
