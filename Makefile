# The two commands: `make demo` and `make test`. Both bootstrap a virtual environment in .venv on
# first use (torch, the pinned dependencies of pyproject.toml, Detectron2 and panopticapi via
# tools/install_detectron2.py) and reuse it afterwards (stamp file, rebuilt when those files change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gbw-installed
# pytest workers; 2 matches the CI machine.
PYTEST_WORKERS ?= 2

.PHONY: setup demo test test-fast experiment env clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	$(PY) tools/install_detectron2.py
	touch $(STAMP)

# One seed of source-only, DACS, DACS + GBW and the target oracle; output/demo/report.md.
demo: $(STAMP)
	$(PY) tools/run_experiment.py --preset demo

# Every arm (GBW on/off, relative/absolute lambda, GBW ablation, oracle), 3 seeds each, finished
# runs reused; output/experiment/report.md.
experiment: $(STAMP)
	$(PY) tools/run_experiment.py --preset experiment

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

# Skips the end-to-end tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" tests

env: $(STAMP)
	$(PY) -m gbw_panoptic.env

clean:
	rm -rf $(VENV) output
