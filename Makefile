# Two entry points: `make demo` (pipelined GPT-2 training on 2 CPU ranks) and `make test` (lint, types, tests).
# Both create .venv when it is missing; torch is pinned so that pip takes the CPU build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pippy-installed

.PHONY: demo test lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchrun --nproc-per-node 2 examples/train_gpt2.py

lint: $(STAMP)
	$(BIN)/ruff check pippy tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
