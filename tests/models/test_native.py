"""models/native: kernels load only from an ahead-of-time build; a machine without one keeps
the torch path and is told the command that builds it."""

from __future__ import annotations

import pytest

from expertmesh.models import native

SPEC = native.KernelSpec("expertmesh_test_kernel", "int f() { return 1; }", ("f",), ("-O2",))


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTMESH_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("EXPERTMESH_KERNEL_BUILD", raising=False)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why_not", {})


def test_an_unbuilt_kernel_is_not_compiled_and_the_reason_names_the_build_command(tmp_path):
    assert native.load(SPEC) is None
    reason = native.why_not(SPEC)
    assert reason is not None and "python -m expertmesh.models.native" in reason
    assert not any(tmp_path.iterdir())  # nothing was built, no lock file left behind


def test_the_kernel_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("EXPERTMESH_TEST_KERNEL", "0")
    assert native.load(SPEC) is None
    assert native.why_not(SPEC) == "EXPERTMESH_TEST_KERNEL=0"


def test_a_broken_build_is_a_reason_not_a_crash(tmp_path):
    directory = native.build_dir(SPEC)
    directory.mkdir(parents=True)
    (directory / f"{SPEC.module_name}.so").write_bytes(b"not an ELF file")
    assert native.load(SPEC) is None
    assert native.why_not(SPEC).startswith("cannot load")


def test_the_build_directory_changes_with_the_source():
    other = native.KernelSpec(SPEC.name, SPEC.source + "\n", SPEC.functions, SPEC.cflags)
    assert native.build_dir(other) != native.build_dir(SPEC)
