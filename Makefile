# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RAY_ENV := RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
PYTEST_ARGS ?=
# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file to each: the files'
# module fixtures (one pipeline run shared by its tests, the documented blocks in order)
# stay in one process. 2 suits a 2-core machine (docs/benchmarks.md, "Test suite");
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-unit lint format docs organism cluster-up cluster-down clean

setup: $(STAMP)

# torch is pinned (constraints.txt) and installed in the same resolve as everything else,
# so pip never pulls the multi-GB CUDA wheels on a CPU machine.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(RAY_ENV) HF_HUB_OFFLINE=1 $(VENV)/bin/crossmodal run configs/pipeline-organism.yaml

test: setup
	$(RAY_ENV) HF_HUB_OFFLINE=1 $(PYTEST) $(PYTEST_ARGS)

test-unit: setup
	$(RAY_ENV) HF_HUB_OFFLINE=1 $(PYTEST) -m "not integration" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check crossmodal jobs tests
	$(VENV)/bin/ruff format --check crossmodal jobs tests

format: setup
	$(VENV)/bin/ruff format crossmodal jobs tests
	$(VENV)/bin/ruff check --fix crossmodal jobs tests

# The config reference, generated from crossmodal/schemas/ (tests/test_schema_doc.py checks it).
docs: setup
	$(PY) -m crossmodal.schemas.doc > docs/config-reference.md
	$(PY) -m crossmodal.schemas.outputs > docs/outputs.md

# Rebuild the shipped model organism deterministically (crossmodal/organism_model/).
organism: setup
	$(VENV)/bin/crossmodal organism --build crossmodal/organism_model

# A local one-GPU (or CPU) Ray head with the environment this project needs (docs/platform.md, "Ray"):
# token auth off so `ray job submit` and `ray status` work, usage stats off, the venv first on
# PATH. It runs as its own process group (`ray start --block`), so cluster-down stops this head
# only (never `ray stop`, which ends every Ray on the host). The ports are variables so that
# two heads can share a host (`make cluster-up RAY_PORT=6380 RAY_DASHBOARD_PORT=8266 ...`).
RAY_PORT ?= 6379
RAY_DASHBOARD_PORT ?= 8265
RAY_CLIENT_PORT ?= 10001
RAY_AGENT_PORT ?= 52365
RAY_HEAD_DIR = $(or $(RAY_TMPDIR),$(TMPDIR),/tmp)/ray
RAY_HEAD_PID = $(RAY_HEAD_DIR)/crossmodal-head.pid

cluster-up: setup
	@mkdir -p $(RAY_HEAD_DIR)
	@test ! -s $(RAY_HEAD_PID) || { echo "a head is up (pid $$(cat $(RAY_HEAD_PID))): make cluster-down first"; exit 1; }
	$(RAY_ENV) PATH="$(abspath $(VENV))/bin:$$PATH" setsid $(VENV)/bin/ray start --head --block \
	    --port=$(RAY_PORT) --dashboard-port=$(RAY_DASHBOARD_PORT) --dashboard-host=127.0.0.1 \
	    --ray-client-server-port=$(RAY_CLIENT_PORT) --dashboard-agent-listen-port=$(RAY_AGENT_PORT) \
	    --disable-usage-stats > $(RAY_HEAD_DIR)/crossmodal-head.log 2>&1 & echo $$! > $(RAY_HEAD_PID)
	@$(PY) -m crossmodal.fleet.head wait --pid $$(cat $(RAY_HEAD_PID)) \
	    --ports $(RAY_PORT),$(RAY_DASHBOARD_PORT),$(RAY_AGENT_PORT) --log $(RAY_HEAD_DIR)/crossmodal-head.log
	@echo "Ray head up: --address auto, or submit to http://127.0.0.1:$(RAY_DASHBOARD_PORT) (README.md, 'Submitting to a cluster')"

cluster-down:
	@test -s $(RAY_HEAD_PID) || { echo "no head started by make cluster-up"; exit 0; }
	$(PY) -m crossmodal.fleet.head stop --pid $$(cat $(RAY_HEAD_PID))
	rm -f $(RAY_HEAD_PID) $(RAY_HEAD_DIR)/ray_current_cluster

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache results
