# trainguard developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-unit test-operator test-trainer test-manifests lint bench clean

venv: $(STAMP)

# torch first, pinned: it comes from the machine's local CPU build; an unpinned torch would
# pull a multi-GB CUDA build. pyproject.toml declares torch>=2.3, which 2.13.0 satisfies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,trainer]'
	touch $(STAMP)

# The whole loop locally: emulated API server, the real operator, trainer pods as local processes.
demo: venv
	$(BIN)/trainguard-operator sandbox --demo --workdir $(CURDIR)/out/demo

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

test-operator: venv
	$(BIN)/python -m pytest -q tests/operator

test-trainer: venv
	$(BIN)/python -m pytest -q tests/trainer

# Benchmarks print figures (never timed assertions); results are recorded in benchmarks/README.md.
bench: venv
	$(BIN)/python benchmarks/trainer_speed.py

test-manifests: venv
	$(BIN)/python -m pytest -q tests/manifests

lint: venv
	$(BIN)/ruff check $(wildcard operator trainer-image tests benchmarks)
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
