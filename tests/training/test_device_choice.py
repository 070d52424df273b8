"""Where Ray Train workers train (`run.device`): auto takes GPUs only when there is one per
worker, cuda without them is an error naming the field and the fix, cpu never asks."""

from __future__ import annotations

import pytest

from expertmesh.training.config import RunSection, TrainingConfigError
from expertmesh.training.runner import wants_gpu


def _run(**fields) -> RunSection:
    return RunSection(name="t", **fields)


def test_device_defaults_to_auto():
    assert _run().device == "auto"


def test_auto_trains_on_gpus_when_every_worker_gets_one():
    assert wants_gpu(_run(num_workers=2), cluster_gpus=2, driver_sees_cuda=False)


def test_auto_stays_on_the_cpu_without_a_gpu_per_worker():
    assert not wants_gpu(_run(num_workers=2), cluster_gpus=1, driver_sees_cuda=True)
    assert not wants_gpu(_run(num_workers=1), cluster_gpus=0, driver_sees_cuda=False)


def test_local_mode_follows_this_process():
    assert wants_gpu(_run(num_workers=0), cluster_gpus=0, driver_sees_cuda=True)
    assert not wants_gpu(_run(num_workers=0), cluster_gpus=4, driver_sees_cuda=False)


def test_cpu_never_asks_for_a_gpu():
    assert not wants_gpu(_run(device="cpu", num_workers=1), cluster_gpus=8, driver_sees_cuda=True)


def test_cuda_without_enough_gpus_names_the_field_and_the_fix():
    with pytest.raises(TrainingConfigError) as err:
        wants_gpu(_run(device="cuda", num_workers=2), cluster_gpus=1, driver_sees_cuda=True)
    assert str(err.value) == (
        "run.device: cuda requested but this Ray cluster offers 1 GPUs for 2 workers; "
        "set run.device: cpu or auto, or use fewer workers"
    )


def test_cuda_in_local_mode_needs_cuda_here():
    with pytest.raises(TrainingConfigError, match="this process sees no CUDA device"):
        wants_gpu(_run(device="cuda", num_workers=0), cluster_gpus=0, driver_sees_cuda=False)


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        _run(device="gpu")
