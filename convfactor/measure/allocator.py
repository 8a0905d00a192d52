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

A preloaded tcmalloc is better still, and the CLI arranges it for the user: ``--malloc auto`` (the
default of ``bench``, ``demo``, ``plan`` and ``compare``) re-executes the command once with
``LD_PRELOAD`` set to the first of :data:`FAST_ALLOCATORS` installed on the machine (Debian's
``libtcmalloc-minimal4``, then ``libjemalloc2``; ``make setup`` installs both when apt is
available), and falls back to ``retain`` when none is.  :func:`malloc_setting` then reports
``tcmalloc``/``jemalloc``, read from the process's own memory map, so every figure records it.

jemalloc is *not* fast out of the box here: its default decay purges freed multi-MiB extents back to
the OS, so activations fault in again as with glibc.  Measured 2026-12-02 on this 2-vCPU Xeon, EDSR
x2 at 256x256, a latency plan at 5.8x fewer MACs, fastest forms, fresh process each: glibc default
774 -> 322 ms (2.41x), retain 619 -> 194 (3.19x), jemalloc as shipped 892 -> 560 (1.59x), jemalloc
with ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`` 585 -> 177 (3.31x), tcmalloc 546 -> 164
(3.33x).  So the re-exec sets that ``MALLOC_CONF`` for jemalloc unless the user set one.

It is process-wide, so nothing here runs at import.  The commands that time models (``bench``,
``demo``, ``plan``) call it explicitly (``--malloc default`` opts out), and
:func:`convfactor.measure.latency.environment` records the setting with every figure.  Both models
of a comparison are always timed under the same setting.  Peak memory is unchanged (the same tensors
are live), but memory freed by the process stays with it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

__all__ = ["set_malloc", "malloc_setting", "malloc_description", "MODES", "FAST_ALLOCATORS", "preloaded_allocator",
           "fast_allocator", "reexec_with_fast_allocator", "JEMALLOC_CONF"]

MODES = ("default", "retain", "auto")
#: shared libraries a process can preload for a faster allocator, in order of preference
FAST_ALLOCATORS = {"tcmalloc": ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                                "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4"),
                   "jemalloc": ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                                "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")}
#: jemalloc's settings for a re-exec (unless ``MALLOC_CONF`` is set): keep freed extents for reuse
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: oneTBB (OpenVINO's threading) loads tbbbind with RTLD_DEEPBIND unless this is set, and then hwloc
#: frees with glibc what the preloaded allocator gave it: ``free(): invalid pointer`` (oneTBB #1636)
TBB_SAFE_ENV = ("TBB_ENABLE_SANITIZERS", "1")
#: set in the re-executed process, so it never re-executes twice
_REEXEC_GUARD = "CONVFACTOR_ALLOCATOR_REEXEC"

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

    ``"auto"``: a preloaded jemalloc/tcmalloc is kept as it is, else ``"retain"``;
    ``"retain"``: large blocks come from the heap and freed memory is kept for reuse;
    ``"default"``: glibc's documented defaults for future allocations (its adaptive mmap threshold
    starts over); memory the process already holds in its heap is still reused, so to time the true
    default, start a fresh process with ``--malloc default``.
    Where ``mallopt`` is not available (not glibc), the mode stays ``default`` and the record says why.
    """
    if mode not in MODES:
        raise ValueError(f"malloc mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":          # keep a preloaded jemalloc/tcmalloc (see reexec_with_fast_allocator), else retain
        return malloc_setting() if preloaded_allocator() else set_malloc("retain")
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
    """``'jemalloc'``/``'tcmalloc'`` when one is preloaded in this process, else ``'retain'`` or
    ``'default'`` as set through this module (recorded with every latency figure)."""
    return preloaded_allocator() or _state["mode"]


def preloaded_allocator() -> str | None:
    """``'jemalloc'`` or ``'tcmalloc'`` when that library is mapped into this process, else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name in FAST_ALLOCATORS if f"lib{name}" in maps), None)


def fast_allocator() -> tuple[str, str] | None:
    """``(name, path)`` of the first installed library of :data:`FAST_ALLOCATORS`, or None."""
    for name, paths in FAST_ALLOCATORS.items():
        for path in paths:
            if os.path.isfile(path):
                return name, path
    return None


def reexec_with_fast_allocator() -> None:
    """Replace this process by the same command line (``sys.orig_argv``) with a fast allocator
    preloaded, when one is installed and none is loaded yet; returns (doing nothing) otherwise.
    Only for a command-line entry point, never from a library call."""
    found = fast_allocator()
    if found is None or preloaded_allocator() or os.environ.get(_REEXEC_GUARD):
        return
    env = dict(os.environ, **{_REEXEC_GUARD: "1"})
    env["LD_PRELOAD"] = ":".join(p for p in (found[1], env.get("LD_PRELOAD")) if p)
    if found[0] == "jemalloc":
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    key, value = TBB_SAFE_ENV
    env.setdefault(key, value)          # OpenVINO's oneTBB aborts under a preload without it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def malloc_description() -> str:
    """The setting and why it is what it is, e.g. ``'default (mallopt not available (not glibc): ...)'``."""
    if preloaded_allocator() == "jemalloc":
        return f"jemalloc (preloaded with LD_PRELOAD, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r})"
    if preloaded_allocator():
        return f"{preloaded_allocator()} (preloaded with LD_PRELOAD)"
    return f"{_state['mode']} ({_state['why']})"
