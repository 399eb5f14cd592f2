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

.PHONY: setup test test-fast demo lint bench-pipeline clean

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
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

# The quick loop: everything but the tests that launch several processes (torchrun jobs, gloo ranks).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests -m "not multirank"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The demo: generate the built-in synthetic stream, then train on it with 2 ranks under torchrun (gloo on CPU).
demo: $(BIN)/.installed
	$(BIN)/python -m pipeline.synthetic --out $(DEMO_DIR)/synthetic --days 5 --rows-per-day 200000 --overwrite
	PYTHONHASHSEED=0 $(BIN)/python -m jobs.launch --standalone --nproc-per-node=2 -- --config jobs/configs/demo.yaml \
		data.path=$(DEMO_DIR)/synthetic train.name=demo --replace
	$(BIN)/python -m jobs.evaluate --run runs/demo --out reports/demo
	$(BIN)/python -m jobs.export --run runs/demo --topology jobs/configs/topology/gpu16x80.yaml --out plans/demo \
		--overwrite

bench-pipeline: $(BIN)/.installed
	$(BIN)/python -m benchmarks.pipeline

clean:
	rm -rf $(VENV) runs reports plans .pytest_cache .mypy_cache .ruff_cache
