"""Smoke run of the runtimes section (issue 13): every back-end timed side by side, planning cold/warm."""
import pytest

from benchmarks import load_section


def test_runtimes_quick_renders_every_backend_row():
    pytest.importorskip("onnxruntime")
    section = load_section("runtimes")
    data = section.measure(True)
    text = section.render(data)
    assert text.startswith("## Runtimes") and "| planned on | timed on |" in text
    row = data.rows[0]
    backends = [b for b in section.backends if b != "compile"]
    lower = [b for b in backends if ":precision=" in b]
    assert set(row.speeds) == set(backends) | {f"{b} vs {b.split(':')[0]}" for b in lower}
    for b in lower:                      # a lower precision: also against the dense fp32 model it replaces
        assert row.speeds[f"{b} vs openvino"].env["baseline"] == "openvino"
        assert "n/a (precision)" in text
    for s in row.speeds.values():
        lo, hi = s.interval
        assert lo <= s.speedup <= hi
    assert data.planning_s["cold_layers_timed"] > 0 == data.planning_s["warm_layers_timed"]   # from the disk cache
    assert "no CUDA row" in text or data.gpu
    assert [r.planned_on for r in data.rows] == [backends[0], backends[-1]]     # quick: the first and the last
    # the allocator table: each fresh process ran under the allocator its line names
    recorded = {(e["model"], e["backend"], e["allocator"]): e.get("recorded") for e in data.allocators}
    assert {m for m, _, _ in recorded} == {"edsr_baseline_x2", "dncnn"}
    assert all(v == ("default" if a == "glibc default" else "retain") for (_, _, a), v in recorded.items())
    assert "### The CPU allocator" in text
