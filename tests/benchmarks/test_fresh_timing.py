"""The benchmarks' fresh-process timing (``python -m benchmarks.fresh_timing``, moved out of the package):
the child really runs under the allocator it is asked for, and records it."""
from __future__ import annotations

import pytest

from benchmarks.fresh_timing import child_env, compare_in_fresh_process
from convfactor import models
from convfactor.measure import allocator

RUN = dict(threads=1, repeats=1, timeout=300)


def test_child_env_drops_an_inherited_preload_for_the_glibc_modes(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4")
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    for mode in ("default", "retain"):
        env = child_env(mode)
        assert "LD_PRELOAD" not in env and "MALLOC_CONF" not in env
    assert child_env("preload")["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4"
    assert child_env("preload", {"MALLOC_CONF": ""})["MALLOC_CONF"] == ""
    with pytest.raises(ValueError, match="preload"):
        child_env("tcmalloc")


def test_fresh_process_timing_records_the_allocator_it_ran_under(monkeypatch):
    """A glibc-mode child does not inherit this process's preload (the CLI re-executes under tcmalloc,
    and its 'glibc default' figures must not silently run on tcmalloc); a preload is passed on request."""
    small, shape = models.get("dncnn", pretrained=True), (1, 1, 24, 24)
    found = allocator.fast_allocator()
    if found is not None:
        monkeypatch.setenv("LD_PRELOAD", found[1])
    res = compare_in_fresh_process("dncnn", small, shape, malloc="default", **RUN)
    assert res["env"]["malloc"] == "default" and res["speedup"] > 0 and res["rounds"] == 3
    if found is None:
        pytest.skip("neither tcmalloc nor jemalloc is installed here: the preload half is not checked")
    assert compare_in_fresh_process("dncnn", small, shape, malloc="preload", **RUN)["env"]["malloc"] == found[0]
    with pytest.raises(ValueError, match="preload"):
        compare_in_fresh_process("dncnn", small, shape, malloc="tcmalloc", **RUN)


def test_a_failing_child_says_why(tmp_path):
    """An unknown model fails in the child; its stderr comes back in the error."""
    with pytest.raises(RuntimeError, match="fresh process failed"):
        compare_in_fresh_process("no_such_model", models.get("dncnn"), (1, 1, 8, 8), **RUN)
