# dimsearch — one command each on a fresh clone: `make demo`, `make test`.
# The CPU stack is pinned and installed in an order that works (DESIGN.md decision 1): torchrec's wheel depends on the
# CUDA fbgemm-gpu, so fbgemm-gpu-cpu goes first and torchrec is installed with --no-deps.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
FBGEMM := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0
TORCHREC_DEPS := tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath numpy
DEMO_DIR ?= runs/demo-data

.PHONY: setup test demo lint bench-pipeline clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install $(FBGEMM)
	$(BIN)/pip install --no-deps $(TORCHREC)
	$(BIN)/pip install $(TORCHREC_DEPS) $(TORCH)
	$(BIN)/pip install -e '.[dev]' $(TORCH)
	touch $@

setup: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(BIN)/.installed
	$(BIN)/python -m jobs.demo --out $(DEMO_DIR)

bench-pipeline: $(BIN)/.installed
	$(BIN)/python -m benchmarks.pipeline

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
