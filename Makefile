# speedstructure: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SS := $(VENV)/bin/speedstructure
DVC := $(VENV)/bin/dvc
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
MLFLOW_DB := sqlite:///$(CURDIR)/mlruns/mlflow.db
OPTUNA_DB := sqlite:///$(CURDIR)/mlruns/optuna.db
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
PROFILE ?= default
GPUS ?= 0

.PHONY: setup data demo repro train train-parallel weights tune predict evaluate report ui dashboard profile lint format test test-fast bench bench-gpu clean-venv

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The synthetic dataset (skipped when the four zips are there and up to date), versioned by data.dvc.
data: setup
	$(SS) synth
	$(DVC) add data

# The whole job on the embedded default: the synthetic data if missing or stale (real zips
# without data/synth_meta.json are left alone), the DVC pipeline, the test MAPE table.
demo: setup
	@if [ -f data/synth_meta.json ] || [ ! -f data/train.zip ]; then $(MAKE) --no-print-directory data; fi
	$(DVC) repro
	@$(SS) report

repro: setup
	$(DVC) repro

# Every training stage (and what they need), then their validation MAPE.
train: setup
	$(DVC) repro train
	$(DVC) metrics show models/*/fold_*/metrics.json

# The pending training stages at once, one GPU each: make train-parallel GPUS="0 1 2 3"
# (each through `dvc repro`, with CUDA_VISIBLE_DEVICES set; logs in logs/train-parallel/)
train-parallel: setup
	$(SS) train-parallel --gpus $(GPUS)

# The pretrained backbone weights, once, online (weights/*.safetensors, tracked by DVC)
weights: setup
	$(SS) fetch-weights

tune: setup
	$(DVC) repro tune

predict: setup
	$(DVC) repro predict

evaluate: setup
	$(DVC) repro evaluate
	@$(SS) report

report: setup
	@$(SS) report

# MLflow UI (runs, metrics, plots, artifacts, the model registry) on http://127.0.0.1:$(UI_PORT)
ui: setup
	@mkdir -p mlruns/artifacts
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --default-artifact-root $(CURDIR)/mlruns/artifacts \
		--host 127.0.0.1 --port $(UI_PORT) --workers 1

# optuna-dashboard over the ensemble-weight studies on http://127.0.0.1:$(DASHBOARD_PORT)
dashboard: setup
	$(VENV)/bin/optuna-dashboard $(OPTUNA_DB) --host 127.0.0.1 --port $(DASHBOARD_PORT)

# Switch params.yaml to another profile: make profile PROFILE=competition
profile: setup
	$(SS) profile $(PROFILE)

# ruff (lint + format check) over the package and the tests
lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# apply ruff's formatter and safe fixes
format: setup
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# everything, lint included (what CI runs: .ci/run)
test: setup lint
	$(PY) -m pytest -q

# the development loop: lint and the fast tests (the slow end-to-end tests deselected)
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

bench: setup
	@mkdir -p bench
	$(SS) bench data --json bench/data.json
	$(SS) bench store --json bench/store.json
	$(SS) bench model --json bench/model.json
	$(SS) bench parallel --json bench/parallel.json

# The competition variants' training path checked and timed on this machine's GPU
bench-gpu: setup
	@mkdir -p bench
	$(SS) bench gpu --json bench/gpu.json

clean-venv:
	rm -rf $(VENV)
