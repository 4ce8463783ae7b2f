# CoroNet DICOM node: the two commands a new user types are `make run` and `make test`.
# Both do their own set-up and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := redis-server dcmtk dicom3tools orthanc openssl curl chromium chromium-driver
DEB_TOOLS := redis-server storescu echoscu storescp dsr2html dciodvfy Orthanc openssl curl chromium chromedriver
CONFIG ?= configs/node.yaml
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: help setup venv system-deps lint typecheck pytest test run clean

help:
	@echo "make run    start the CoroNet node with the embedded defaults ($(CONFIG))"
	@echo "make test   install what is missing, then lint, type-check and run the test suite"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian tools used by the node, the tests and the demo.  Installed with apt-get when we are
# root; otherwise the exact command is printed and the target fails.
system-deps:
	@missing=""; for t in $(DEB_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "missing tools:$$missing"; \
	  if [ "$$(id -u)" = "0" ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES) >/dev/null; \
	  else \
	    echo "run: sudo apt-get update && sudo apt-get install -y --no-install-recommends $(DEB_PACKAGES)"; \
	    exit 1; \
	  fi; \
	fi

setup: venv system-deps

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: setup lint typecheck pytest

run: setup
	$(VENV)/bin/coronet run --config $(CONFIG) $(RUN_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
