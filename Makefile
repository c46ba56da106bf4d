# hf_aligned developer commands (transformers style).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test style quality demo clean

# Torch goes first and pinned: the CPU build lies on local disk, while a bare `torch`
# requirement (pulled by sentence-transformers) would fetch a multi-GB CUDA build.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

style: install
	$(BIN)/ruff format hf_aligned tests examples benchmarks
	$(BIN)/ruff check --fix hf_aligned tests examples benchmarks

quality: install
	$(BIN)/ruff format --check hf_aligned tests examples benchmarks
	$(BIN)/ruff check hf_aligned tests examples benchmarks

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
