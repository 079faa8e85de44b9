# speedstructure: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: setup data demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(VENV)/bin/speedstructure synth
	$(VENV)/bin/dvc add data

demo: data

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/speedstructure bench data --json bench/data.json
