# convfactor: the two commands a new user runs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.convfactor-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned and installed first: here `torch==2.13.0` is a CPU wheel on local disk,
# while an unpinned `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/convfactor demo

test: setup
	$(PY) -m pytest -q -n 2 tests

bench: setup
	$(VENV)/bin/convfactor bench -o BENCHMARKS.md

clean:
	rm -rf $(VENV) convfactor-demo .pytest_cache .hypothesis
