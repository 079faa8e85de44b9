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
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
PROFILE ?= default
GPUS ?= 0
ADDRESS ?= auto
STORAGE ?= shared

.DEFAULT_GOAL := help

.PHONY: help clean setup data doctor demo repro train train-parallel train-cluster weights tune predict evaluate refine report exp plots ui dashboard server profile lint format test test-fast bench bench-simulator bench-gpu clean-venv

help: ## this list (the default target)
	@echo "speedstructure: make TARGET (README.md has the details)"
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  make %-15s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# Remove the pipeline's outputs (store, folds, models, ensemble, registry, submission, metrics,
# reports, plots) and logs, bench results and dvc_plots/; data/, the venv and mlruns/ (the MLflow
# and Optuna history) stay.  `dvc pull` or `dvc repro` brings the outputs back (the small ones
# committed to git also `git checkout -- .`)
clean: ## remove the pipeline outputs, logs, bench results, dvc_plots/ (not data/, mlruns/, .venv)
	rm -rf store folds models ensemble registry submission metrics reports plots dvc_plots logs bench

# Create the virtual environment and install the package (once; again when pyproject.toml changes)
$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# (and the page `dvc plots show` fills, vega inlined: .dvc/config plots.html_template)
setup: $(VENV)/.installed ## create .venv and install the package (again when pyproject.toml changes)
	@$(SS) plots-template --quiet

# The synthetic dataset (skipped when the four zips are there and up to date), versioned by data.dvc.
# `dvc add` and `dvc repro` copy a folder they first take in (data/, store/) into the DVC cache
# whatever cache.type says; `dvc checkout --relink` then links the two (hard links, read-only in
# the workspace: every writer here replaces files, never edits them), halving the disk taken
data: setup ## write the synthetic dataset into data/ (skipped when up to date) and dvc add it
	$(SS) synth
	$(DVC) add data
	$(DVC) checkout --relink --quiet data.dvc

# The whole job on the embedded default: the synthetic data if missing or stale (real zips
# without data/synth_meta.json are left alone), the DVC pipeline, the test MAPE table.
demo: setup ## the whole job on the embedded default data, then the test-MAPE table
	@$(SS) doctor || echo "make demo: going on despite the doctor's findings above"
	@if [ -f data/synth_meta.json ] || [ ! -f data/train.zip ]; then $(MAKE) --no-print-directory data; fi
	$(DVC) repro
	$(DVC) checkout --relink --quiet
	@$(SS) report

# This machine and what the active profile will cost on it (20 s of timed steps; exit 1 with
# one line per reason when it cannot run the profile: disk, no GPU for the competition profile)
doctor: setup ## this machine, the project's state and the projected cost of the active profile
	$(SS) doctor

repro: setup ## dvc repro: run what changed
	$(DVC) repro
	$(DVC) checkout --relink --quiet

# Every training stage (and what they need), then their validation MAPE.
train: setup ## every training stage, then their validation MAPE
	$(DVC) repro train
	$(DVC) metrics show models/*/fold_*/metrics.json

# The pending training stages at once, one GPU each: make train-parallel GPUS="0 1 2 3"
# (Ray tasks on a local Ray instance, each through `dvc repro` with CUDA_VISIBLE_DEVICES set;
# logs in logs/train-parallel/)
train-parallel: setup ## pending training stages at once, one GPU each (GPUS="0 1 2 3")
	$(SS) train-parallel --gpus $(GPUS)

# The same on a Ray cluster (docs/cluster.md): make train-cluster ADDRESS=head:6379, with
# STORAGE=clone where the nodes share no file system (a DVC remote carries the data), and there
# CACHE_DIR=/local/disk/dvc-cache: one DVC cache per node, shared by its clones
train-cluster: setup ## pending training stages on a Ray cluster (ADDRESS=head:6379 STORAGE=shared|clone)
	$(SS) train-parallel --address $(ADDRESS) --storage $(STORAGE) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR))

# The pretrained backbone weights, once, online (weights/*.safetensors, tracked by DVC)
weights: setup ## download the pretrained backbone weights once (online)
	$(SS) fetch-weights

tune: setup ## the Optuna ensemble weights (and the training they need)
	$(DVC) repro tune

predict: setup ## the submission from the registered model
	$(DVC) repro predict

evaluate: setup ## the test evaluation, then the table
	$(DVC) repro evaluate
	@$(SS) report

# Full-waveform refinement of the submission's predictions (the refine stage, off in the pipeline:
# refine.enabled false): every test sample, or SAMPLES=N (the first N) / SAMPLES=id1,id2;
# ITERATIONS=n overrides refine.iterations.  Writes submission/refined/ and metrics/refine.json
refine: setup ## FWI refinement of the predictions, slow (SAMPLES=N|id,id ITERATIONS=n)
	$(SS) refine --run $(if $(SAMPLES),--samples $(SAMPLES)) $(if $(ITERATIONS),--iterations $(ITERATIONS))

report: setup ## print the test-MAPE table of the last evaluation
	@$(SS) report

# The experiments of HEAD side by side (`dvc exp run -S KEY=VALUE` adds one): the ensemble's
# CV, test, R2_lat and out-of-distribution figures and the parameters that differ, in 120
# columns (`dvc metrics show` / `dvc metrics diff` have every metric, each run's included)
exp: setup ## the experiments side by side in 120 columns (dvc exp show)
	@$(DVC) exp show --no-pager --only-changed --drop 'Created|.*[/:]|[a-z0-9_]+$$|heldout\.' \
		--keep '(cv_mape|test_mape|lateral_r2|ood_test_mape)$$'

# Every plot (the training curves of all runs, the tuned weights, per-sample test MAPE,
# the figures) in dvc_plots/index.html, readable offline
plots: setup ## every plot in dvc_plots/index.html, readable offline
	$(DVC) plots show

# MLflow UI (runs, metrics, plots, artifacts, the model registry) on http://127.0.0.1:$(UI_PORT):
# one server (2 processes); MLflow's job runner (huey consumers: 8 more processes, ~1.4 GB) is off
ui: setup ## MLflow UI on http://127.0.0.1:5000 (UI_PORT=...)
	@mkdir -p mlruns/artifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
		$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --default-artifact-root $(CURDIR)/mlruns/artifacts \
		--host 127.0.0.1 --port $(UI_PORT) --workers 1

# optuna-dashboard over the ensemble-weight studies on http://127.0.0.1:$(DASHBOARD_PORT):
# those of SPEEDSTRUCTURE_OPTUNA_STORAGE when it is set (`make server` prints it), else the SQLite file
dashboard: setup ## optuna-dashboard on http://127.0.0.1:8080 (DASHBOARD_PORT=...)
	$(VENV)/bin/optuna-dashboard "$${SPEEDSTRUCTURE_OPTUNA_STORAGE:-$(OPTUNA_DB)}" --host 127.0.0.1 --port $(DASHBOARD_PORT)

# The team's MLflow tracking server (speedstructure server): mlflow server on a PostgreSQL it
# manages in mlruns/postgres, artifacts in mlruns/server-artifacts; prints the MLFLOW_TRACKING_URI
# (and Optuna's storage) to export; Ctrl-C stops the server and PostgreSQL
server: setup ## MLflow tracking server on PostgreSQL for a team (SERVER_HOST=, SERVER_PORT=5000)
	$(SS) server --host $(SERVER_HOST) --port $(SERVER_PORT)

# Switch params.yaml to another profile: make profile PROFILE=competition
profile: setup ## switch params.yaml to a profile (PROFILE=competition | default)
	$(SS) profile $(PROFILE)

# ruff (lint + format check) over the package and the tests
lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# apply ruff's formatter and safe fixes
format: setup ## apply ruff format and safe fixes
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# everything, lint included (what CI runs: .ci/run)
test: setup lint ## lint and every test (what CI runs)
	$(PY) -m pytest -q -n auto --dist loadfile

# the development loop: lint and the fast tests (the slow end-to-end tests deselected)
test-fast: setup lint ## lint and the fast tests
	$(PY) -m pytest -q -m "not slow"

bench: setup ## the CPU benchmarks into bench/*.json
	@mkdir -p bench
	$(SS) bench data --json bench/data.json
	$(SS) bench store --json bench/store.json
	$(SS) bench model --json bench/model.json
	$(SS) bench training --json bench/training.json
	$(SS) bench parallel --json bench/parallel.json

# The floor picker and a trained model on test models simulated at 1 m / 0.1 ms (the
# organisers' grid) against the project's gathers; the fine set is kept in bench/simulator/
# and reused while its settings match (8 models: about 9 min of simulation on one core here)
bench-simulator: setup ## the picker and the model on 1 m / 0.1 ms gathers (bench/simulator.json)
	@mkdir -p bench
	$(SS) bench simulator --json bench/simulator.json

# The competition variants' training path checked and timed on this machine's GPU
bench-gpu: setup ## the competition training path timed on this machine's GPU
	@mkdir -p bench
	$(SS) bench gpu --json bench/gpu.json

clean-venv: ## remove .venv
	rm -rf $(VENV)
