#!/usr/bin/env bash
# The GPU check, in one go, at most 8 minutes: a venv with a CUDA build of PyTorch, the `gpu`
# tests (tests/gpu/), then benchmarks/bench_gpu.py (our engine vs vLLM's CUDA build vs
# transformers, one checkpoint, batch 1, 8, 32) writing benchmarks/results/gpu_check.json
# with the tests' pass/fail counts folded in.
#
#     benchmarks/gpu_check.sh              # from anywhere; on a machine with an NVIDIA GPU
#
# Online (pypi.org reachable): a fresh venv at $GPU_VENV gets vLLM (which brings its CUDA
# torch), then expertmesh with its dev extra. VLLM=0 skips vLLM (plain CUDA torch instead).
# Offline (a lent GPU machine that reaches nothing): the venv is made on top of the machine's
# own python3 (--system-site-packages: its CUDA torch, transformers, pytest), wheels carried
# in .whl/ are installed from there (ray, pydantic, ... for the cluster and training tests;
# without ray those skip, saying so), and expertmesh goes in without dependencies; vLLM is
# then absent and the JSON says so.
#
# Knobs: GPU_VENV (default /tmp/expertmesh-gpu-venv), PYTHON (python3), VLLM (1),
# BENCH_SIZE (small), BUDGET_S (480), GPU_LOG_DIR (benchmarks/out/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-480}
VENV=${GPU_VENV:-/tmp/expertmesh-gpu-venv}
PYTHON=${PYTHON:-python3}
LOGS=${GPU_LOG_DIR:-benchmarks/out/gpu_check}
mkdir -p "$LOGS"
say() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*"; }
left() { echo $((BUDGET_S - SECONDS)); }

if ! nvidia-smi -L; then
    say "no NVIDIA GPU here (nvidia-smi failed); this check needs one"
    exit 2
fi

if "$PYTHON" -c "import socket; socket.create_connection(('pypi.org', 443), 3)" 2>/dev/null; then
    say "online: fresh venv at $VENV"
    "$PYTHON" -m venv "$VENV" || exit 3
    PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if [ "${VLLM:-1}" = 1 ]; then
        # vLLM pins its own CUDA torch; installing it first lets expertmesh reuse that torch.
        timeout 300 "${PIP[@]}" vllm || say "vLLM did not install; going on without it"
    fi
    "$VENV/bin/python" -c "import torch" 2>/dev/null || timeout 240 "${PIP[@]}" torch || exit 3
    timeout "$(left)" "${PIP[@]}" -e '.[dev]' || exit 3
else
    say "offline: venv over $("$PYTHON" -c 'import sys; print(sys.executable)')'s packages"
    "$PYTHON" -m venv --system-site-packages "$VENV" || exit 3
    PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "${PIP[@]}" --no-deps .whl/*.whl || say "some carried wheels did not install"
    fi
    if ! "${PIP[@]}" --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1; then
        # An old setuptools cannot build the editable install: lay the packages out as
        # pyproject.toml's package-dir maps them (links into this checkout) and point a .pth
        # file at them.
        say "editable install failed (see $LOGS/install.log); linking the packages instead"
        "$VENV/bin/python" - "$VENV" <<'PY' || exit 3
import os, sys, sysconfig, tomllib
from pathlib import Path
repo, venv = Path.cwd(), Path(sys.argv[1])
shim = venv / "expertmesh-src"
dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
top = shim / "expertmesh"
top.mkdir(parents=True, exist_ok=True)
for entry in (repo / dirs["expertmesh"]).iterdir():
    link = top / entry.name
    if not link.exists():
        link.symlink_to(entry)
for name, folder in dirs.items():
    if name.count(".") == 1 and not (top / name.split(".")[1]).exists():
        (top / name.split(".")[1]).symlink_to(repo / folder)
site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
# Imported at start-up from the links, so a checkout's own expertmesh/ (the current folder
# under `python -m pytest`) never shadows it.
line = f"import sys; sys.path.insert(0, {str(shim)!r}); import expertmesh; sys.path.pop(0)\n"
(site / "expertmesh-src.pth").write_text(line)
PY
    fi
fi
PY="$VENV/bin/python"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 4
"$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || say "vllm: not importable (the benchmark leaves it out and says why)"

# The tests get what is left minus the benchmark's share (about 3 minutes for `small`).
tests_s=$(( $(left) - 190 ))
if [ "$tests_s" -lt 60 ]; then tests_s=60; fi
say "gpu tests (up to ${tests_s}s)"
PYTHONUNBUFFERED=1 timeout "$tests_s" "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider \
    --junitxml "$LOGS/gpu-tests.xml" 2>&1 | tee "$LOGS/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
say "gpu tests exit $tests_rc"

bench_s=$(left)
repeats=3
if [ "$bench_s" -lt 150 ]; then repeats=1; fi
if [ "$bench_s" -lt 45 ]; then bench_s=45; fi
say "benchmark (up to ${bench_s}s, $repeats repeats)"
PYTHONUNBUFFERED=1 timeout "$bench_s" "$PY" benchmarks/bench_gpu.py --size "${BENCH_SIZE:-small}" \
    --repeats "$repeats" --vllm-timeout-s $((bench_s / 2)) --tests-junit "$LOGS/gpu-tests.xml" \
    2>&1 | tee "$LOGS/bench.log"
bench_rc=${PIPESTATUS[0]}
say "benchmark exit $bench_rc; results: benchmarks/results/gpu_check.json; logs: $LOGS"
if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
