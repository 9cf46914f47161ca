# The environment is created on first use: `make train` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
BENCHMARKS := exactness overhead overhead_parts memory_flatness probe_accuracy paper_claim strategies balance \
	partitioned distributed

.PHONY: install train test test-fast lint readme readme-check bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

train: install
	$(BIN)/mbp train recipes/digits.yaml

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check mbp_cli tests bench tools
	$(BIN)/lint-imports

# The README's transcripts rerun in a scratch copy and written in as the commands print them
# today (tools/readme.py; tests/test_readme.py checks them). About 2 minutes on 2 CPU cores.
readme: install
	$(BIN)/python -m tools.readme

# The training transcripts compared as well (their losses and accuracies are this CPU's float
# rounding, so `make test` leaves them out); about 2 minutes on 2 CPU cores.
readme-check: install
	$(BIN)/python -m pytest tests/test_readme.py -m "transcript or not transcript"

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,bench]"
	touch $(BENCH_STAMP)

# Every benchmark, each writing bench/results/<name>.json (and .png where it plots).
bench: $(BENCH_STAMP)
	for name in $(BENCHMARKS); do $(BIN)/python bench/$$name.py || exit 1; done

# On a machine with a CUDA GPU: the GPU tests, then the benchmarks on the GPU, each writing
# bench/results/<name>-cuda.json (about 10 minutes on one H100).
gpu-check: $(BENCH_STAMP)
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA GPU')"
	$(BIN)/python -m pytest -m gpu -q
	$(BIN)/python bench/strategies.py --device cuda
	$(BIN)/python bench/overhead.py --device cuda --rounds 20
	$(BIN)/python bench/memory_flatness.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
