# One entry point for people and CI. `make demo` = the main job, `make test` = the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-core
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Main job (for now): train the default SupCon configuration on the bundled data, evaluate it.
demo: setup
	@test -f runs/demo/trial_0/index.faiss || $(VENV)/bin/neurocbir train --loss supcon --trials 1 --out runs/demo
	$(VENV)/bin/neurocbir evaluate runs/demo --json runs/demo/metrics.json

test: setup
	$(PY) -m pytest -q

# The results document: all five losses on fold 5 (and SupCon on every fold). Slow.
bench-core: setup
	$(PY) benchmarks/core_results.py
