"""The esrgan section (issue 22): the three fits of SRMD at equal ranks, Real-ESRGAN's RRDBNet under Sedky &
Hosmer's marking and the latency planner, each with fidelity and measured speed; targets judged, MISSED said."""
import math

import pytest

from benchmarks import esrgan, load_section
from convfactor.measure.compare import SpeedComparison


def test_esrgan_quick_measures_every_fit_and_point():
    section = load_section("esrgan")
    data = section.measure(True, backends=("torch",))
    text = section.render(data)
    assert text.startswith(f"## {esrgan.TITLE}")
    assert [f.fit for f in data.fits] == list(esrgan.FITS)
    # identical ranks for the three fits: one timing per method
    assert [s.label for s in data.speeds] == ["SRMD x2, channel_svd 8"]
    for f in data.fits:
        assert math.isfinite(f.loss_db) and f.fidelity_db > 0 and f.loss_after_ft_db is not None
    assert [p["label"] for p in data.rrdb] == ["Sedky & Hosmer: channel SVD", "latency planner, 2x on torch"]
    assert data.rrdb[1]["plan_s"] > 0
    # at 12² on eager a tiny RRDBNet's factorized layers may all time slower: then the row says so
    for p in (p for p in data.rrdb if "failed" not in p):
        assert 0 < p["macs_ratio"] < 1 and p["speeds"][0].backend == "torch"
        assert p["fidelity_ft_db"] > 0 and math.isfinite(p["psnr_ft"]) and p["ft_s"] > 0   # all but CP are fine-tuned
    assert "MISSED" in text or "met" in text


def _speed(x, lo):
    s = SpeedComparison.__new__(SpeedComparison)
    s.speedup, s.interval, s.noise = x, (lo, x * 1.01), []
    return s


def test_the_targets_are_judged_by_the_interval_and_the_quality():
    res = esrgan.Results(esrgan.QUICK, 30.0)
    res.fits = [esrgan.Fit("channel_svd", 48, "data-aware (independent)", 1, 3.4, 20),
                esrgan.Fit("channel_svd", 48, "sequential (default)", 1, 1.8, 25)]
    assert "**MISSED** (0.53 of it)" in esrgan._verdict_seq(res)
    res.fits[1].loss_db = 1.7
    assert "**met**" in esrgan._verdict_seq(res)
    res.precision = [{"model": "srmd_x2", "speed": _speed(8.0, 7.9), "psnr": 34.0, "loss_db": 0.01},
                     {"model": "srmd_x4", "speed": _speed(3.1, 2.9), "psnr": 30.0, "loss_db": 0.01}]
    lines = esrgan._precision_table(res)
    assert lines[2].endswith("| met |") and lines[3].endswith("| MISSED |")     # 2.9x lower edge misses 3x


def test_an_rrdbnet_plan_is_judged_before_and_after_fine_tuning_at_its_own_speed():
    from types import SimpleNamespace
    point = {"label": "Sedky & Hosmer: channel SVD", "macs_ratio": 0.5, "seconds": 10, "psnr": 24.0,
             "fidelity_db": 31.0, "speeds": [SimpleNamespace(backend="openvino", comparison=_speed(2.2, 2.05))],
             "psnr_ft": 24.85, "fidelity_ft_db": 33.0, "ft_s": 600}
    row = esrgan._rrdb_row(point, 25.0)
    assert row[4:] == ["31.00", "-1.000", "10", "met", "33.00", "-0.150", "10.0", "met"]
    point["psnr_ft"] = 25.3                     # a gain beyond 0.2 dB is a change too (GAN output moved)
    assert esrgan._rrdb_row(point, 25.0)[-1] == "MISSED"
    point["speeds"] = [SimpleNamespace(backend="openvino", comparison=_speed(2.1, 1.95))]    # interval below 2x
    point["psnr_ft"] = 25.0
    row = esrgan._rrdb_row(point, 25.0)
    assert (row[7], row[11]) == ("MISSED", "MISSED")
    del point["psnr_ft"]
    assert esrgan._rrdb_row(point, 25.0)[-4:] == ["-", "-", "-", "-"]


def test_a_latency_plan_that_factorized_nothing_is_a_row_saying_so():
    res = esrgan.Results(esrgan.QUICK, 30.0)
    res.rrdb_base = {"psnr": 25.0, "marked": 3, "threshold": 10.0, "planned_on": "openvino"}
    res.rrdb = [{"label": "latency planner, 2x on openvino", "plan_s": 5.0, "planner_speedup": 1.0,
                 "planner_message": "unreachable", "failed": "the planner factorized no layer (none measured faster)"}]
    text = "\n".join(esrgan._rrdb_table(res) + esrgan._planner_words(res))
    assert "| latency planner, 2x on openvino | the planner factorized no layer" in text
    assert "2x on openvino: 1.00x (unreachable)" in text
