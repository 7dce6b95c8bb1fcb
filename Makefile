# medse: `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: an unpinned torch would pull the newest CUDA build (several GB).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.medse-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

# nnU-Net v2 integration (medse.integrations.nnunet): a second environment, because nnunetv2 pulls timm and
# torchvision, and the registry's torchvision wheels (CUDA builds) do not load next to the CPU torch above.
# torch 2.14.1 + torchvision 0.29.1 (CUDA builds, about 6 GB installed) work on CPU too; nnunetv2 2.8.1 tested.
NNUNET_VENV ?= .venv-nnunet
NNUNET_BIN := $(NNUNET_VENV)/bin
NNUNET_STAMP := $(NNUNET_VENV)/.medse-installed
NNUNET_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
NNUNET_SPEC ?= nnunetv2==2.8.1
NNUNET_DISK_GB ?= 8

# Refuse to start an install that cannot fit: pip's own "No space left on device" comes after minutes of work
# and leaves a half-built environment. $(1): GB needed, $(2): the environment's folder, $(3): what it is.
define need_disk
	@$(PYTHON) -c "import os, shutil, sys; d = os.path.dirname(os.path.abspath('$(2)')); \
	free = shutil.disk_usage(d).free / 2**30; \
	sys.exit(0 if free >= $(1) else f'make: $(2) ($(3)) needs about $(1) GB free in {d}; {free:.1f} GB free')"
endef

.PHONY: setup demo test test-all lint bench docs clean setup-nnunet test-nnunet test-nnunet-slow

$(STAMP): pyproject.toml
	$(call need_disk,3,$(VENV),the medse environment)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/medse demo --output $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not nnunet" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check medse tests benchmarks pipelines tools

bench: setup
	$(BIN)/python benchmarks/bench_blocks.py
	$(BIN)/python benchmarks/bench_networks.py

# README and docs/ tables are copied from results files (docs/results/, benchmarks/results/) by tools/docsync.py;
# `python -m tools.docsync generate NAME` reruns a results file's commands (`... list` shows them).
docs: setup
	$(BIN)/python -m tools.docsync

$(NNUNET_STAMP): pyproject.toml
	$(call need_disk,$(NNUNET_DISK_GB),$(NNUNET_VENV),nnU-Net environment with the torch 2.14.1 CUDA build)
	$(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_BIN)/python -m pip install $(NNUNET_TORCH_SPEC)
	$(NNUNET_BIN)/python -m pip install "$(NNUNET_SPEC)"
	$(NNUNET_BIN)/python -m pip install -e ".[dev]"
	touch $(NNUNET_STAMP)

setup-nnunet: $(NNUNET_STAMP)

# fast nnU-Net tests (networks, plans derivation on plans made by nnUNetv2_plan_and_preprocess; no training)
test-nnunet: setup-nnunet
	OMP_NUM_THREADS=1 nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 \
		$(NNUNET_BIN)/python -m pytest -q -m "nnunet and not slow" tests/test_nnunet_networks.py \
		tests/test_nnunet_pipeline.py tests/test_export_nnunet.py $(PYTEST_ARGS)

# the end-to-end CPU run: plan/preprocess -> short training of baseline and scse -> predict -> compare
test-nnunet-slow: setup-nnunet
	OMP_NUM_THREADS=1 nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 \
		$(NNUNET_BIN)/python -m pytest -q -m "nnunet and slow" tests/test_nnunet_pipeline.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(NNUNET_VENV) runs .pytest_cache
