"""Device options of the model core (`models/device.py`): which device a node's `device:` gives,
the clear error for `cuda` without a GPU, the dtype rule, and the CPU path of the host staging
buffers (unchanged: no copy, no pinned memory). The CUDA side is in tests/gpu/."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models.device import (
    DeviceError,
    HostStaging,
    dtype_for,
    model_device,
    resolve_device,
)
from expertmesh.models.errors import ConfigError, ModelError

NO_CUDA_MESSAGE = (
    "node gpu-0: device cuda requested but this Ray node has no CUDA device; "
    "set device: cpu or auto"
)


def test_cpu_is_cpu_even_where_a_gpu_is_seen():
    assert resolve_device("cpu", "gpu-0", cuda_available=True) == torch.device("cpu")


def test_auto_is_cpu_without_a_gpu():
    assert resolve_device("auto", "cpu-fast", cuda_available=False) == torch.device("cpu")


def test_auto_is_cuda_where_a_gpu_is_seen():
    assert resolve_device("auto", "gpu-0", cuda_available=True).type == "cuda"


def test_cuda_without_a_gpu_names_the_node_and_the_fix():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", "gpu-0", cuda_available=False)
    assert str(err.value) == NO_CUDA_MESSAGE
    assert isinstance(err.value, ModelError)  # the CLI reports model errors as one line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_this_machine_without_a_gpu_is_refused():
    with pytest.raises(DeviceError, match="node gpu-0: device cuda requested"):
        resolve_device("cuda", "gpu-0")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", "", None, 1])
def test_unknown_device_names_the_node_and_the_choices(bad):
    with pytest.raises(DeviceError) as err:
        resolve_device(bad, "cpu-slow")  # type: ignore[arg-type]
    text = str(err.value)
    assert text.startswith(f"node cpu-slow: device {bad!r} is not one of auto, cuda, cpu")


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    assert dtype_for(torch.device("cuda", 0), "auto") == torch.bfloat16
    assert dtype_for("cpu", "auto") == torch.float32
    assert dtype_for("cpu") == torch.float32


def test_an_explicit_dtype_is_kept_on_every_device():
    assert dtype_for("cuda", "float32") == torch.float32
    assert dtype_for("cpu", "bfloat16") == torch.bfloat16
    assert dtype_for("cuda", torch.float16) == torch.float16


def test_an_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype 'fp8' is not supported"):
        dtype_for("cpu", "fp8")


def test_model_device_is_where_the_weights_are():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU


def test_host_staging_passes_cpu_rows_through_untouched():
    staging = HostStaging()
    x = torch.randn(5, 8).to(torch.bfloat16)
    assert staging.to_host(x) is x  # the CPU path: no copy, no cast
    assert staging.to_device(x, torch.device("cpu")) is x
    staging.release(x)  # a tensor it passed through: nothing to hand back
    assert staging._free == [] and staging._lent == {}  # no pinned buffer without a GPU
