# lungburden — build, demo and test on a fresh Debian 12 / Python 3.11 machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
APT_PACKAGES := orthanc orthanc-dicomweb orthanc-python dcmtk dicom3tools redis-server
# tests/test_docker.py: the Docker daemon, compose, and debootstrap for the base image.
APT_PACKAGES += docker.io docker-compose debootstrap
# tests/test_viewer_browser.py: headless Chromium; npm (from Debian where Node.js has none) fetches OHIF.
APT_PACKAGES += chromium
OHIF_CACHE ?= $(HOME)/.cache/lungburden-ohif
DEMO_DIR ?= demo-out
# Real CT used by tests, evaluation and benchmarks (read in place, never copied).
LUNGBURDEN_DATA ?= $(abspath $(CURDIR)/../shared/data)
export LUNGBURDEN_DATA

.PHONY: install demo test lint system-deps viewer-deps clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the integration tests talk to (real Orthanc, DCMTK, dciodvfy, Docker).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The published OHIF viewer (npm package @ohif/app, its built dist/), cached outside the repository.
viewer-deps: install system-deps
	LUNGBURDEN_OHIF_CACHE=$(OHIF_CACHE) $(PY) tests/viewer/ohif.py

demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/lungburden phantom $(DEMO_DIR)/phantom --seed 7
	$(VENV)/bin/lungburden analyze $(DEMO_DIR)/phantom --out $(DEMO_DIR)/result
	$(VENV)/bin/lungburden node-demo $(DEMO_DIR)/phantom --out $(DEMO_DIR)/node

lint: install
	$(VENV)/bin/ruff check lungburden tests benchmarks

test: install system-deps viewer-deps
	$(VENV)/bin/ruff check lungburden tests benchmarks
	LUNGBURDEN_OHIF_CACHE=$(OHIF_CACHE) $(VENV)/bin/python -m pytest -q -ra

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
