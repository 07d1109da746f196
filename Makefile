# The two commands: `make run` (the default job) and `make test` (the whole suite).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# CPU wheel of torch that lies on this kind of machine; clusters with CUDA keep their own build.
TORCH_CPU ?= torch==2.13.0
NPROC   ?= 2
TEST_JOBS ?= 2
ARGS    ?=
# DeepSpeed compiles a C++ op at its first start, under a lock file in this directory; a job
# killed mid-build leaves the lock and every later DeepSpeed start waits on it for ever. The
# project keeps its own (built once by `setup`, before any test kills a job).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	  else $(BIN)/pip install -q $(TORCH_CPU); fi; fi
	$(BIN)/pip install -q -e '.[dev,report]'
	DS_ACCELERATOR=cpu $(BIN)/python -m launch.prebuild
	touch $@

setup: $(VENV)/.installed

run: setup
	DS_ACCELERATOR=cpu $(BIN)/kintsugi launch --nproc-per-node $(NPROC) --config configs/tiny.toml $(ARGS)

# Two parts: most tests TEST_JOBS at a time (one test file per worker, so its fixtures are
# made once), then the `serial` ones alone (tests/conftest.py says which and why). Exit code
# 5 is "nothing selected" (an ARGS -k that matches only one part).
test: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not serial" tests $(ARGS) || [ $$? -eq 5 ]
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m serial tests $(ARGS) || [ $$? -eq 5 ]

bench: setup
	DS_ACCELERATOR=cpu $(BIN)/python benchmarks/train_throughput.py --json runs/bench/train_throughput.json

clean:
	rm -rf runs .pytest_cache
