"""The allocator setting: it really stops page faults on reused activations, and it is recorded.

Each check runs in a fresh interpreter, since ``mallopt`` changes the whole process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convfactor.measure import allocator
from convfactor.measure.latency import environment

PROBE = r"""
import json, resource, sys
import torch
from convfactor.measure.allocator import set_malloc, malloc_setting
def faults_per_forward(n=7):
    # a fake forward: activations of 16, 16 and 64 MiB allocated, written and freed in turn;
    # the median over n forwards, so one late heap growth (a busy machine) does not count
    counts = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.empty(4 * 2**20).fill_(1.0)
        b = torch.empty(4 * 2**20).fill_(1.0); del a
        c = torch.empty(16 * 2**20).fill_(1.0); del b, c
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[n // 2]
modes = sys.argv[1:]
out = {}
for mode in modes:
    set_malloc(mode)
    faults_per_forward(4)                    # warm-up: the heap grows over the first forwards
    out[mode] = {"recorded": malloc_setting(), "faults": faults_per_forward()}
print(json.dumps(out))
"""
PAGES = (16 + 16 + 64) * 2**20 // 4096      # pages touched per fake forward

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or allocator._libc_mallopt() is None,
                                reason="glibc mallopt only")


def _probe(*modes: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, *modes], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@glibc_only
def test_retain_stops_page_faults_on_reused_activations():
    default, retain = _probe("default")["default"], _probe("retain")["retain"]
    assert default["recorded"] == "default" and retain["recorded"] == "retain"
    assert default["faults"] > 0.25 * PAGES          # glibc default: fresh mappings fault in every time
    assert retain["faults"] < 0.01 * PAGES           # retained: the same memory is reused


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="malloc mode"):
        allocator.set_malloc("jemalloc")


def test_environment_records_the_setting():
    assert environment(1)["malloc"] == allocator.malloc_setting()


def test_description_names_the_recorded_setting():
    assert allocator.malloc_description().startswith(allocator.malloc_setting() + " (")


def _compare_allocator_line(*extra):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "convfactor.cli", "compare", "resnet20", "resnet20", "--threads", "1",
                          "--rounds", "1", "--max-rounds", "1", *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return next(line for line in out.stdout.splitlines() if "allocator:" in line)


def test_the_cli_preloads_an_installed_fast_allocator_by_itself():
    from convfactor.measure.allocator import fast_allocator
    found = fast_allocator()
    if found is None:
        pytest.skip("neither jemalloc nor tcmalloc is installed here (make setup installs jemalloc where apt works)")
    assert f"allocator: {found[0]} (preloaded" in _compare_allocator_line()
    assert "allocator: retain" in _compare_allocator_line("--malloc", "retain")        # opting out is honoured


def test_reexec_prefers_tcmalloc_and_keeps_jemalloc_from_purging(monkeypatch):
    """tcmalloc comes first; a jemalloc re-exec gets MALLOC_CONF with purging off (its shipped decay
    returned freed activations to the OS: EDSR measured 1.59x instead of 3.3x), unless the user set one."""
    assert list(allocator.FAST_ALLOCATORS)[0] == "tcmalloc"
    calls = []
    monkeypatch.setattr(allocator, "preloaded_allocator", lambda: None)
    monkeypatch.setattr(allocator, "fast_allocator", lambda: ("jemalloc", "/x/libjemalloc.so.2"))
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: calls.append(env))
    monkeypatch.delenv("CONVFACTOR_ALLOCATOR_REEXEC", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    allocator.reexec_with_fast_allocator()
    assert calls[-1]["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert calls[-1]["LD_PRELOAD"].startswith("/x/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    allocator.reexec_with_fast_allocator()
    assert calls[-1]["MALLOC_CONF"] == "narenas:1"
    monkeypatch.setattr(allocator, "fast_allocator", lambda: ("tcmalloc", "/x/libtcmalloc_minimal.so.4"))
    monkeypatch.delenv("MALLOC_CONF")
    allocator.reexec_with_fast_allocator()
    assert "MALLOC_CONF" not in calls[-1]
