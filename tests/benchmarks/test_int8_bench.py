"""Smoke run of the int8 section (issue 15): four ORT variants timed interleaved and scored."""
import pytest

from benchmarks import load_section


def test_int8_quick_renders_four_variants():
    pytest.importorskip("onnxruntime")
    section = load_section("int8")
    data = section.measure(True)
    text = section.render(data)
    assert text.startswith("## Low rank + int8") and [r["variant"] for r in data.rows] == [
        "dense fp32", "dense int8", "low-rank fp32", "low-rank int8"]
    assert data.rows[0]["speedup"] == pytest.approx(1.0) and len(data.kept_fp32) == 2
    assert data.rows[1]["mbytes"] < 0.5 * data.rows[0]["mbytes"]
    for r in data.rows:
        assert r["interval"][0] <= r["speedup"] <= r["interval"][1] or r["variant"] == "dense fp32"
