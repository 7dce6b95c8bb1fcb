# medse: `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: an unpinned torch would pull the newest CUDA build (several GB).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.medse-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/medse demo --output $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check medse tests benchmarks pipelines

bench: setup
	$(BIN)/python benchmarks/bench_blocks.py
	$(BIN)/python benchmarks/bench_networks.py

# README and docs/ tables are copied from results files (docs/results/, benchmarks/results/) by medse.utils.docsync;
# `python -m medse.utils.docsync generate NAME` reruns a results file's commands (`... list` shows them).
docs: setup
	$(BIN)/python -m medse.utils.docsync

clean:
	rm -rf $(VENV) runs .pytest_cache
