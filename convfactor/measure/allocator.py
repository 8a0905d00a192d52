"""The CPU memory allocator, as a recorded measurement setting.

glibc's ``malloc`` serves large blocks with ``mmap`` (above ``M_MMAP_THRESHOLD``: 128 KiB, adapting
up to 32 MiB) and gives freed memory at the top of the heap back to the OS (above
``M_TRIM_THRESHOLD``).  A CNN at image resolution allocates a fresh multi-MiB activation per layer
per forward (a 64 x 256 x 256 float32 map is 16 MiB), so with the defaults every activation is a new
mapping whose pages fault in, zero-filled, on first touch, at every call.  Measured on
EDSR-baseline x2 at a 256 x 256 input, 2 threads: the network's ReLUs, residual adds and mean shifts
alone took 94 ms per forward with the defaults and 31 ms with freed memory retained; the dense
model's fastest form did not change (1001 ms either way).  The cost is per *tensor*, not per MAC,
so it weighs most on a factorized model, whose convs are cheap but whose activations are not.

Production CPU deployments avoid it by preloading jemalloc or tcmalloc (Intel's PyTorch CPU
performance guide recommends exactly that); a preload must happen before the process starts, which a
library cannot do.  :func:`set_malloc` (``"retain"``) gets the same effect inside a running process
with two ``mallopt`` calls: no ``mmap`` for large blocks and no trimming, so freed activations are
reused.  Hand-written because no maintained Python package exposes ``mallopt``.

It is process-wide, so nothing here runs at import.  The commands that time models (``bench``,
``demo``, ``plan``) call it explicitly (``--malloc default`` opts out), and
:func:`convfactor.measure.latency.environment` records the setting with every figure.  Both models
of a comparison are always timed under the same setting.  Peak memory is unchanged (the same tensors
are live), but memory freed by the process stays with it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["set_malloc", "malloc_setting", "malloc_description", "MODES"]

MODES = ("default", "retain")

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAIN = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}

_state = {"mode": "default", "why": "process default (glibc malloc untouched)"}


def _libc_mallopt():
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_malloc(mode: str) -> str:
    """Set the process's allocator mode; returns the setting as recorded (see :func:`malloc_setting`).

    ``"retain"``: large blocks come from the heap and freed memory is kept for reuse;
    ``"default"``: glibc's documented defaults for future allocations (its adaptive mmap threshold
    starts over); memory the process already holds in its heap is still reused, so to time the true
    default, start a fresh process with ``--malloc default``.
    Where ``mallopt`` is not available (not glibc), the mode stays ``default`` and the record says why.
    """
    if mode not in MODES:
        raise ValueError(f"malloc mode must be one of {', '.join(MODES)}, got {mode!r}")
    mallopt = _libc_mallopt()
    if mallopt is None:
        _state.update(mode="default", why="mallopt not available (not glibc): allocator untouched")
        return malloc_setting()
    settings = _RETAIN if mode == "retain" else _GLIBC_DEFAULTS
    if mode == "default":   # lower the trim threshold last, after mmap is allowed again
        order = [_M_MMAP_MAX, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD]
    else:
        order = [_M_TRIM_THRESHOLD, _M_MMAP_MAX]
    failed = [p for p in order if mallopt(p, settings[p]) != 1]
    if failed:
        _state.update(mode="default", why=f"mallopt refused parameter(s) {failed}")
        return malloc_setting()
    _state.update(mode=mode, why=("glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1 (freed memory reused)"
                                  if mode == "retain" else "glibc defaults restored by mallopt"))
    return malloc_setting()


def malloc_setting() -> str:
    """``'retain'`` or ``'default'``, as set through this module (recorded with every latency figure)."""
    return _state["mode"]


def malloc_description() -> str:
    """The setting and why it is what it is, e.g. ``'default (mallopt not available (not glibc): ...)'``."""
    return f"{_state['mode']} ({_state['why']})"
