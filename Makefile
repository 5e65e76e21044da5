# The commands people type. Every target bootstraps .venv on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all keras-backends fuzz lint format bench bench-average bench-sweep bench-dcp bench-significance quality quality-lm clean

# torch first, pinned: pip takes the CPU wheel from local disk. Asking for the
# rest first could let a dependency pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all,dev,keras-backends]" torch==2.13.0
	touch $(STAMP)

# On the torch backend, as the README's output was run (with TensorFlow installed too,
# Keras would otherwise pick TensorFlow, whose rounding ends the same seed elsewhere).
demo: $(STAMP)
	KERAS_BACKEND=torch $(BIN)/polyak demo

# Keras fixes its backend once per process: the suite runs on torch (tests/conftest.py),
# then the Keras tests run again in one process per other backend.
# tests/test_keras_backends.py runs once: it starts a process per backend itself.
KERAS_BACKENDS := jax tensorflow
KERAS_TESTS = $(filter-out tests/test_keras_backends.py,$(wildcard tests/test_keras_*.py))

test: $(STAMP)
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory keras-backends

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""
	$(MAKE) --no-print-directory keras-backends PYTEST_ARGS='-m ""'

# The backends run side by side (one process each; a backend is fixed per process):
# on 2 cores that takes about 75 s where one after the other took about 115 s. Each
# one's output is printed whole once both are done.
keras-backends: $(STAMP)
	@logs=$$(mktemp -d); \
	for backend in $(KERAS_BACKENDS); do \
		( KERAS_BACKEND=$$backend $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) \
			$(KERAS_TESTS) > $$logs/$$backend.log 2>&1; echo $$? > $$logs/$$backend.status ) & \
	done; \
	wait; status=0; \
	for backend in $(KERAS_BACKENDS); do \
		echo "Keras tests on the $$backend backend"; cat $$logs/$$backend.log; \
		[ "$$(cat $$logs/$$backend.status)" = 0 ] || status=1; \
	done; \
	rm -rf $$logs; exit $$status

# The readers fuzzed longer than in `make test`: 5000 examples per Hypothesis property,
# then each parser under atheris (coverage-guided, seeded from real files) for
# FUZZ_SECONDS; an input that breaks one is saved in tests/fuzz_regressions/TARGET/,
# which `make test` replays.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := safetensors_header safetensors_file safetensors_index torch_zip npz keras_archive manifest dcp_directory
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
bench: bench-average bench-sweep bench-dcp bench-significance

bench-average: $(STAMP)
	$(BIN)/python bench/average.py --install-tools

bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep.py --repeats 5

bench-dcp: $(STAMP)
	$(BIN)/python bench/dcp.py

bench-significance: $(STAMP)
	$(BIN)/python bench/significance.py --repeats 5

# The multi-seed study: does averaging help? Rewrites its README section and plot, and
# bench/results/quality.json, the raw results behind them.
quality: $(STAMP)
	$(BIN)/python bench/quality.py

# The language-model part of the study, its own target: 5 seeds took 47 min on this
# 2-core machine shared with other jobs (4 min for the least loaded seed). Rewrites its
# README table and bench/results/quality-lm.json.
quality-lm: $(STAMP)
	$(BIN)/python bench/language_model.py

clean:
	rm -rf $(VENV) polyak-demo .pytest_cache
