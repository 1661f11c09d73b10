# UVD: `make demo` and `make test` set everything up themselves, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uvd-installed
# CPU build here; users with CUDA can set TORCH_SPEC and TORCH_INDEX (e.g. the cu12x wheel index).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Debian packages the project needs (installed only when missing; needs root or sudo).
DEBIAN_PACKAGES ?= libosmesa6

.PHONY: setup system demo test bench clean

setup: $(STAMP)

system:
	@bash scripts/install_system_packages.sh $(DEBIAN_PACKAGES)

$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml scripts/install_system_packages.sh
	@$(MAKE) --no-print-directory system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/uvd demo --out demo_out

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) demo_out out build .pytest_cache
