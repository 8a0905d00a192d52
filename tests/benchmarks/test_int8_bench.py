"""The int8 section (issues 15 and 21): each runtime's variants timed interleaved against its own dense
fp32 model and scored through the runtime; the stacked target judged per runtime."""
import pytest

from benchmarks import int8, load_section


def _row(runtime, variant, speed, psnr, lo=None):
    return dict(runtime=runtime, variant=variant, ms=100 / speed, speedup=speed, interval=(lo or speed * 0.98, speed),
                psnr=psnr, mbytes=None)


def test_int8_quick_renders_every_runtime_and_precision(monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    monkeypatch.setattr(int8, "cpu_has", lambda *flags: False)        # the same variants on every CPU
    section = load_section("int8")
    data = section.measure(True)
    text = section.render(data)
    assert text.startswith("## Low rank + int8 / bf16") and [(r["runtime"], r["variant"]) for r in data.rows] == [
        (rt, f"{m} {p}") for rt in ("onnxruntime", "openvino") for m in ("dense", "low-rank") for p in ("fp32", "int8")]
    assert [r["speedup"] for r in data.rows if r["variant"] == "dense fp32"] == pytest.approx([1.0, 1.0])
    assert "/head/Conv" in data.kept_fp32 and any(n.startswith("/tail/") for n in data.kept_fp32)   # reads, writes the image
    assert data.rows[1]["mbytes"] < 0.5 * data.rows[0]["mbytes"] and data.rows[4]["mbytes"] is None
    for r in data.rows:
        assert r["interval"][0] <= r["speedup"] <= r["interval"][1] or r["variant"] == "dense fp32"
    assert "on onnxruntime:" in text and "on openvino:" in text


def test_bf16_is_measured_only_where_the_cpu_runs_it(monkeypatch):
    monkeypatch.setattr(int8, "cpu_has", lambda *flags: True)
    assert int8.precisions("openvino") == ("fp32", "int8", "bf16") and int8.precisions("onnxruntime") == ("fp32", "int8")
    monkeypatch.setattr(int8, "cpu_has", lambda *flags: False)
    assert int8.precisions("openvino") == ("fp32", "int8")


def test_the_stacked_target_needs_both_the_interval_and_the_loss():
    rows = [_row("openvino", "dense fp32", 1.0, 33.40), _row("openvino", "low-rank fp32", 3.9, 33.32),
            _row("openvino", "low-rank int8", 6.5, 33.10), _row("openvino", "low-rank bf16", 7.8, 33.25, lo=7.5),
            _row("onnxruntime", "dense fp32", 1.0, 33.40), _row("onnxruntime", "low-rank int8", 6.2, 33.30, lo=5.9)]
    lines = int8.target_lines(rows)
    assert lines[0].endswith("on openvino: met by low-rank bf16 (7.80x, 0.150 dB lost).")
    assert lines[1].endswith("on onnxruntime: **MISSED** (6.20x, 0.100 dB lost).")        # interval reaches 5.9x
