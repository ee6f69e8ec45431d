# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RAY_ENV := RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
PYTEST_ARGS ?=

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
	$(RAY_ENV) HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(RAY_ENV) HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

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
# token auth off so `ray job submit` and `ray status` work, usage stats off.
cluster-up: setup
	$(RAY_ENV) $(VENV)/bin/ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats
	@echo "Ray head up. Submit: $(VENV)/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.pipeline configs/organism.yaml"

cluster-down:
	$(RAY_ENV) $(VENV)/bin/ray stop --force

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache results
