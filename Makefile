# The commands people type. Every target bootstraps .venv on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all fuzz lint format bench bench-average bench-sweep quality clean

# torch first, pinned: pip takes the CPU wheel from local disk. Asking for the
# rest first could let a dependency pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/polyak demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

# The readers fuzzed longer than in `make test`: 5000 examples per Hypothesis property,
# then each parser under atheris (coverage-guided, seeded from real files) for
# FUZZ_SECONDS; an input that breaks one is saved in tests/fuzz_regressions/TARGET/,
# which `make test` replays.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := safetensors_header safetensors_file safetensors_index torch_zip npz keras_archive manifest
fuzz: $(STAMP)
	POLYAK_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
	status=0; for target in $(FUZZ_TARGETS); do \
		$(BIN)/python tests/fuzz_run.py $$target --seconds $(FUZZ_SECONDS) || status=1; \
	done; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

# Benchmarks run by hand; their results go into the README.
bench: bench-average bench-sweep

bench-average: $(STAMP)
	$(BIN)/python bench/average.py --install-tools

bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep.py --repeats 5

# The multi-seed study: does averaging help? Rewrites its README section and plot.
quality: $(STAMP)
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) polyak-demo .pytest_cache
