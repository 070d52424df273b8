"""The skip hook of tests/conftest.py: without a CUDA device exactly the `gpu`-marked tests
skip, with the reason "no CUDA device"; a test whose name or parameter id merely says gpu runs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def _hook_source(config: pytest.Config) -> str:
    for plugin in config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == str(CONFTEST):
            return inspect.getsource(plugin.pytest_collection_modifyitems)
    raise AssertionError(f"{CONFTEST} is not loaded as a conftest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_only_marked_tests_skip_without_cuda(pytester, request):
    pytester.makeconftest("import pytest\nimport torch\n\n\n" + _hook_source(request.config))
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    pytester.makepyfile(
        test_sample="""
        import pytest

        @pytest.mark.gpu
        def test_marked():
            raise AssertionError("must not run without CUDA")

        def test_named_after_a_gpu_but_unmarked():
            pass

        @pytest.mark.parametrize("device", ["gpu"])  # its id "gpu" is a keyword, not a marker
        def test_parametrized_with_gpu(device):
            pass
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*no CUDA device*"])
