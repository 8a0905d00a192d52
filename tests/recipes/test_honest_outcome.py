"""A missed target or a slower model is said as loudly as a success: the verdict by the interval, the
demo's exit status, its report title and warnings, and the model it ships (injected clocks)."""
import json
import random

import pytest

from convfactor import cli
from convfactor.commands import demo
from convfactor.measure.compare import SpeedComparison


def _comparison(speedup, lo, hi, noise=()):
    form = {"median_ms": 1.0, "iqr_ms": 0.0}
    return SpeedComparison(original={"contiguous": form}, compressed={"contiguous": form}, original_best="contiguous",
                           compressed_best="contiguous", speedup=speedup, same_form={}, interval=(lo, hi),
                           rounds=5, noise=list(noise))


@pytest.mark.parametrize("speedup,lo,hi,kind", [(3.4, 3.1, 3.6, "met"), (2.1, 1.9, 2.3, "missed"),
                                                (3.1, 2.6, 3.7, "unconfirmed"), (0.8, 0.7, 0.9, "slower"),
                                                (3.0, 3.0, 3.0, "met")])
def test_verdict_is_judged_by_the_interval(speedup, lo, hi, kind):
    v = _comparison(speedup, lo, hi, noise=["busy"] if kind == "unconfirmed" else ()).verdict(3.0)
    assert v.kind == kind and v.ok == (kind == "met")
    assert ("target met" in v.line) == (kind == "met")
    if kind != "met":
        assert v.line.split(":")[0].isupper()            # TARGET MISSED / NOT CONFIRMED / SLOWER ...


def test_a_success_measured_on_a_busy_machine_keeps_its_caveats_on_the_line():
    """Seen in the real noise run: 3.98x (3.63-4.73x) while a burner held both cores; the interval clears 3x,
    so it is met, but the line says the machine was busy and why (the quiet figure was 3.2x)."""
    reason = "the original's time drifted 145% between rounds"
    v = _comparison(3.98, 3.63, 4.73, noise=[reason]).verdict(3.0)
    assert v.kind == "met" and "on a busy machine" in v.line and reason in v.line
    assert "busy" not in _comparison(3.4, 3.1, 3.6).verdict(3.0).line


def _args(out, speedup=3.0):
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "-o", str(out), "--speedup", str(speedup), "--planner", "budget",
                              "--threads", "1", "--input-size", "24", "--steps", "2", "--batch-size", "2",
                              "--patch-size", "16", "--eval-side", "48", "--eval-images", "1"])
    return args


def _run_with_clock(monkeypatch, tmp_path, capsys, ratio, jitter, speedup=3.0):
    """The demo with a clock where the compressed model runs ``ratio`` x faster, +-``jitter`` noise."""
    rng = random.Random(0)

    def clock(module, inputs):
        big = sum(p.numel() for p in module.parameters()) > 1_000_000
        return (1.0 if big else 1.0 / ratio) * (1 + rng.uniform(-jitter, jitter)) * 1e-3

    make = demo.pipeline_config
    monkeypatch.setattr(demo, "pipeline_config", lambda a: _with_timer(make(a), clock))
    out = tmp_path / "demo"
    code = demo.run(_args(out, speedup))
    printed = capsys.readouterr().out
    return code, printed, out


def _with_timer(cfg, clock):
    cfg.timer, cfg.train_side = clock, 64
    return cfg


def test_a_noisy_miss_never_prints_success_and_exits_non_zero(monkeypatch, tmp_path, capsys):
    code, printed, out = _run_with_clock(monkeypatch, tmp_path, capsys, ratio=1.4, jitter=0.6)
    assert code == 3
    assert "target met" not in printed and ("TARGET MISSED" in printed or "NOT CONFIRMED" in printed)
    report = json.loads((out / "report.json").read_text())
    assert "target" in report["title"] and "met" not in report["title"].split("target")[1][:5]
    assert report["warnings"] and "3x request" in report["warnings"][-1]
    assert "Warning:" in (out / "report.html").read_text()
    assert (out / "model" / "recipe.json").is_file()              # the compressed model is shipped, labelled


def test_a_slower_model_is_not_shipped(monkeypatch, tmp_path, capsys):
    code, printed, out = _run_with_clock(monkeypatch, tmp_path, capsys, ratio=0.5, jitter=0.02)
    assert code == 1 and "SLOWER THAN THE ORIGINAL" in printed and "ORIGINAL model" in printed
    recipe = json.loads((out / "model" / "recipe.json").read_text())
    assert recipe["layers"] == {} or not recipe["layers"]           # the original: nothing factorized
    assert "slower than the original" in json.loads((out / "report.json").read_text())["title"]


def test_a_confirmed_target_exits_zero(monkeypatch, tmp_path, capsys):
    code, printed, out = _run_with_clock(monkeypatch, tmp_path, capsys, ratio=4.0, jitter=0.02)
    assert code == 0 and "target met" in printed and "TARGET MISSED" not in printed
    assert json.loads((out / "demo.json").read_text())["verdict"]["kind"] == "met"
    assert json.loads((out / "model" / "recipe.json").read_text())["layers"]
