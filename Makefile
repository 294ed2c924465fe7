# milan-bench: `make demo` runs the embedded default grid; `make test` runs the test suite.
# Both create the virtual environment at .venv first (python3 -m venv + pip install -e .[test]).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test slurm chromium clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job: the smoke grid (ablations/smoke.yaml) with the local executor (which waits for every
# cell); the demo data and teacher are made on first use; writes reports/smoke/report.md.
demo: setup
	$(PY) bench.py ablate

# Everything the tests need: the loopback Slurm cluster, headless Chromium, then pytest.
test: setup slurm chromium
	$(PY) -m pytest $(PYTEST_ARGS)

slurm:
	bash scripts/local-slurm.sh start

chromium:
	bash scripts/install-chromium.sh

clean:
	rm -rf runs reports/smoke mlflow.db mlflow-artifacts test-artifacts
