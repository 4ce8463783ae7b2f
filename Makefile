# CoroNet DICOM node: the two commands a new user types are `make run` and `make test`.
# Both do their own set-up and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := redis-server dcmtk dicom3tools orthanc orthanc-dicomweb openssl \
	curl chromium chromium-driver iproute2 util-linux tesseract-ocr
DEB_TOOLS := redis-server redis-cli storescu echoscu storescp dsr2html dciodvfy dcentvfy Orthanc \
	openssl curl chromium chromedriver ip unshare tesseract
DEB_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
# The OHIF viewer of the viewer tests (tests/viewer/): the npm tarball of @ohif/app ships a
# prebuilt dist/, unpacked into a cache folder outside the repository; nothing is built.
OHIF_VERSION := 3.13.2
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/coronet
OHIF_DIR := $(CACHE_DIR)/ohif/$(OHIF_VERSION)
OHIF_DIST := $(OHIF_DIR)/dist
CONFIG ?= configs/node.yaml
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: help setup venv system-deps ohif lint typecheck pytest test screenshots run clean

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
	for f in $(DEB_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
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

# npm checks the tarball against the registry's integrity hash; the unpacked folder appears
# only when complete, so an interrupted run starts again.
$(OHIF_DIST)/index.html:
	@# Debian's npm only where there is none: a NodeSource nodejs ships its own and conflicts.
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends npm >/dev/null; \
	  else echo "npm is needed to fetch OHIF; run: sudo apt-get install -y npm"; exit 1; fi; }
	rm -rf "$(OHIF_DIR).part" && mkdir -p "$(OHIF_DIR).part"
	cd "$(OHIF_DIR).part" && npm pack --silent --cache "$(CACHE_DIR)/npm" @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -xzf "$(OHIF_DIR).part/ohif-app-$(OHIF_VERSION).tgz" -C "$(OHIF_DIR).part" \
	  --strip-components=1 package/dist package/package.json
	rm -f "$(OHIF_DIR).part/ohif-app-$(OHIF_VERSION).tgz"
	rm -rf "$(OHIF_DIR)" && mv "$(OHIF_DIR).part" "$(OHIF_DIR)"

ohif: $(OHIF_DIST)/index.html

setup: venv system-deps ohif

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

pytest: setup
	OHIF_DIST="$(OHIF_DIST)" $(VENV)/bin/pytest $(PYTEST_ARGS)

test: setup lint typecheck pytest

# The README's screenshots (docs/images/ohif-*.png and console-*.png), from the browser tests.
screenshots: setup
	SCREENSHOT_DIR=docs/images OHIF_DIST="$(OHIF_DIST)" $(VENV)/bin/pytest tests/viewer \
		tests/test_console_browser.py

run: setup
	$(VENV)/bin/coronet run --config $(CONFIG) $(RUN_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
