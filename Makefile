# The README's commands. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-all lint demo quickstart bench

# torch is pinned in the same command as everything else so the resolver takes the CPU wheel on this machine
# (and the matching CUDA build on a GPU box) instead of downloading the newest CUDA build.
$(BIN)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/python experiments/demo.py

quickstart: setup
	$(BIN)/python experiments/run.py +exp=quickstart
