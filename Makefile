# obsdiff: `make export TARGET=cpu` (sets up, prunes, exports, validates) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.obsdiff-setup

TARGET   ?= cpu
MODEL    ?= models/digits-sd
OUT      ?= build/$(TARGET)
PATTERN  ?=
SPARSITY ?=
HEIGHT   ?=
WIDTH    ?=
EXTRA    ?=

.PHONY: setup test lint export default-model bench bench-quick bench-structured clean

setup: $(STAMP)

# Re-runs only when the pins or the project metadata change, so a second `make setup` does nothing.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -rs

# import-linter walks the package as a wheel lays it out (exporters/ inside obsdiff/), so it checks a flat copy.
lint: setup
	$(BIN)/ruff check obsdiff exporters targets calibration_data tests benchmarks
	rm -rf build/lint
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation --no-compile --target build/lint/site .
	cd build/lint && PYTHONPATH=site $(abspath $(BIN))/lint-imports $(CURDIR)/pyproject.toml

export: setup
	mkdir -p $(dir $(OUT))
	$(BIN)/obsdiff ship --target $(TARGET) --model $(MODEL) --out $(OUT) \
		$(if $(PATTERN),--pattern $(PATTERN)) $(if $(SPARSITY),--sparsity $(SPARSITY)) \
		$(if $(HEIGHT),--height $(HEIGHT)) $(if $(WIDTH),--width $(WIDTH)) $(EXTRA)

default-model: setup
	$(BIN)/python -m obsdiff.digits.train

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick

bench: setup
	$(BIN)/python -m benchmarks.run

# Structured pruning under FLOP budgets, with Torch-Pruning (an optional dependency) as the peer.
bench-structured: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python -m benchmarks.structured_budget
	$(BIN)/python -m benchmarks.structured_latency --flops 0.6 --runs 20

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
