# loramux — the two set-up commands are `make run` and `make test`; each builds .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR):$(CURDIR)/clients

.PHONY: venv test test-all lint bench bench-adapters bench-routing proto run clean

venv: $(STAMP)

# torch==2.13.0 is installed first, on its own: it is the CPU build on this machine's disk, and
# installing it before anything that depends on torch keeps pip from reaching for a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check core service tests bench
	$(PY) -m ruff format --check core service tests bench
	$(PY) -m mypy

bench: bench-adapters bench-routing

bench-adapters: $(STAMP)
	$(PY) -m bench.adapter_manager

bench-routing: $(STAMP)
	$(PY) -m bench.lora_routing

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
