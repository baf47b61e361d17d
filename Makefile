# The two commands a reader types:
#   make reproduce   installs into .venv, runs the whole study (PRESET=default), renders reports/
#   make test        installs into .venv, ruff + unit tests + nbval of every notebook (smoke)
# Options: make reproduce PRESET=smoke|default|large|validation ONLY=01_ihvp_accuracy DEVICE=cuda SEED=0

PRESET ?= default
ONLY ?=
DEVICE ?= cpu
SEED ?= 0
# Extra pipeline arguments, e.g. PIPELINE_ARGS="-p language_model.n_queries=4 --allow-dirty".
PIPELINE_ARGS ?=
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch only (e.g. an index of CPU or CUDA builds).
TORCH_PIP_ARGS ?=
NBVAL_CELL_TIMEOUT ?= 1800

BOOTSTRAP_PYTHON ?= python3
VENV := .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip
RUFF := $(VENV)/bin/ruff
STAMP := $(VENV)/.installed

# Same environment for every target: deterministic hashing, no display, no network for models.
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg
export JUPYTER_PREFER_ENV_PATH := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

NOTEBOOK_IPYNB := $(wildcard notebooks/[0-9][0-9]_*.ipynb)
ONLY_ARGS := $(if $(strip $(ONLY)),--only "$(ONLY)")

.PHONY: all install reproduce test lint format unit nbval notebooks bench clean-venv help

all: help

help:
	@echo "make reproduce [PRESET=default|smoke|large|validation] [ONLY=NN_topic] [DEVICE=cpu|cuda]"
	@echo "make test      ruff, unit tests, nbval of every notebook at the smoke preset"
	@echo "make notebooks refresh notebooks/*.ipynb outputs (smoke preset) from the .py sources"
	@echo "make bench     EK-FAC speed benchmark"

# torch first (pinned), then the package with every extra the study and the tests use.
$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install -e ".[dev]"
	@touch $@

install: $(STAMP)

reproduce: $(STAMP)
	$(PYTHON) -m influence.study.pipeline --preset "$(PRESET)" --device "$(DEVICE)" \
		--seed "$(SEED)" $(ONLY_ARGS) $(PIPELINE_ARGS)

test: $(STAMP) lint unit nbval

lint: $(STAMP)
	$(RUFF) check .
	$(RUFF) format --check .

unit: $(STAMP)
	$(PYTHON) -m pytest tests -q

# Executes every committed notebook at the preset in its parameters cell (smoke) and compares
# the cells marked "# NBVAL_CHECK_OUTPUT" with the committed outputs.
nbval: $(STAMP)
ifeq ($(strip $(NOTEBOOK_IPYNB)),)
	@echo "nbval: no notebooks/NN_*.ipynb yet; nothing to execute"
else
	$(PYTHON) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/sanitize.cfg \
		--nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) $(NOTEBOOK_IPYNB)
endif

# Re-execute each notebook as written (smoke) and store its outputs in the paired .ipynb.
notebooks: $(STAMP)
	$(PYTHON) -m influence.study.pipeline --sync-notebooks $(ONLY_ARGS)

format: $(STAMP)
	$(RUFF) check --fix .
	$(RUFF) format .

bench: $(STAMP)
	$(PYTHON) bench/bench_ekfac.py

clean-venv:
	rm -rf $(VENV)
