# Two entry points for a fresh machine: `make run` (set up + main job) and `make test`.
# Each creates the virtual environment in .venv if it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m xlstm_jax

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# One pytest worker per core (pytest-xdist), each test file on one worker so its module fixtures compile once.
# The tests' programs are tiny: XLA's CPU compiler skips its LLVM optimisations, which cost most of their
# compile time (XLA's own passes still run, no fast-math): the suite in 12 instead of 14.5 minutes on 2 cores.
TEST_XLA_FLAGS := --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
test: lint
	XLA_FLAGS="$$XLA_FLAGS $(TEST_XLA_FLAGS)" $(PY) -m pytest -q -n auto --dist loadfile

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
