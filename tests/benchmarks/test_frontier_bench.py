"""The frontier section (issues 15 and 21): every approach runs through the pipeline on its back-end,
targets are judged per back-end by the interval's lower edge and the loss bound, gains are against the
single-stage baseline on the same back-end, and the runtime's gain against the baseline on eager."""
from types import SimpleNamespace

import pytest

from benchmarks import frontier, load_section
from benchmarks.frontier import BASELINE, Point, Results, stacked_label


def _p(approach, request, speed, loss, model="edsr_baseline_x2", lo=None, before=None, backend="torch"):
    return Point(model, approach, request, backend=backend, speedup=speed, interval=(lo or speed * 0.98, speed * 1.02),
                 loss_db=loss, loss_before_db=before, macs_reduction=2 * speed)


def test_targets_are_met_only_by_a_point_inside_both_bounds_on_their_backend():
    points = [_p(BASELINE, 3.0, 3.2, 0.06), _p("data-aware", 3.0, 3.1, 0.04, lo=2.95),
              _p(BASELINE, 3.0, 3.9, 0.12, backend="openvino"), _p("data-aware", 3.0, 3.5, 0.30, backend="openvino"),
              _p(BASELINE, 5.0, 5.3, 0.20, backend="openvino"),
              _p(stacked_label("bf16"), 3.0, 11.0, 0.19, backend="openvino:precision=bf16 vs openvino"),
              _p(stacked_label("int8"), 3.0, 7.0, 0.25, backend="openvino:precision=int8 vs openvino")]
    lines = frontier.target_lines(points)
    assert lines[0].startswith("- edsr_baseline_x2: >= 3x at <= 0.05 dB (eager): **MISSED**")   # interval < 3x
    assert "single-stage weight proxy at 3x: 3.20x, 0.060 dB" in lines[0]
    assert lines[1].startswith("- edsr_baseline_x2: >= 3x at <= 0.15 dB (openvino fp32): met by latency planner "
                               "(3.90x, 0.120 dB)")
    assert "**MISSED**" in lines[2] and "5.30x, 0.200 dB" in lines[2]                         # loss above 0.15
    assert lines[3] == "- dncnn: >= 3x at <= 0.1 dB (openvino fp32): not measured (no point)." or len(lines) == 4
    assert lines[-1].startswith("- edsr_baseline_x2, openvino with a lower precision stacked >= 6x against its dense "
                                "fp32 at <= 0.2 dB: met by latency planner + bf16 (3x plan: 11.00x, 0.190 dB lost)")


def test_a_stacked_target_is_missed_when_every_point_loses_too_much():
    lines = frontier.stacked_target_lines([_p(stacked_label("int8"), 3.0, 7.0, 0.25,
                                              backend="openvino:precision=int8 vs openvino")])
    assert lines == ["- edsr_baseline_x2, openvino with a lower precision stacked >= 6x against its dense fp32 at <= "
                     "0.2 dB: **MISSED** (3x plan: 7.00x, 0.250 dB lost)."]


def test_the_srmd_targets_count_any_openvino_precision_against_its_dense_fp32_but_only_eager_for_eager():
    da = "data-aware"
    points = [_p(da, 2.0, 2.1, 0.40, model="srmd_x2"), _p(da, 3.0, 3.2, 0.90, model="srmd_x2", backend="openvino"),
              _p(stacked_label("bf16", da), 3.0, 16.0, 0.91, model="srmd_x2", backend="openvino:precision=bf16 vs openvino"),
              _p(stacked_label("int8", da), 3.0, 9.0, 0.12, model="srmd_x2", backend="openvino:precision=int8 vs openvino"),
              _p(da, 3.0, 3.1, 0.01, model="srmd_x2", backend="onnxruntime")]     # another runtime: not counted
    eager, best = [line for line in frontier.target_lines(points) if line.startswith("- srmd_x2: ")]
    assert eager == ("- srmd_x2: >= 2x at <= 0.05 dB (eager): **MISSED** (least loss at that speed: data-aware on "
                     "torch, 2.10x, 0.400 dB).")
    assert best == ("- srmd_x2: >= 3x at <= 0.15 dB (openvino, any precision, against its dense fp32): met by "
                    "data-aware + int8 (9.00x, 0.120 dB).")
    slow = [_p(da, 3.0, 2.5, 0.02, model="srmd_x2", backend="openvino")]
    assert "**MISSED** (fastest: data-aware on openvino, 2.50x, 0.020 dB)" in frontier.target_lines(slow)[-1]


def test_gains_are_reported_against_the_same_request_and_backend_baseline():
    lines = frontier.gain_lines([_p(BASELINE, 3.0, 3.2, 0.08, before=2.0), _p("data-aware", 3.0, 3.1, 0.05, before=1.5),
                                 _p("data-aware", 3.0, 3.6, 0.05, backend="openvino"),
                                 _p(stacked_label("int8"), 3.0, 4.0, 0.1, backend="openvino:precision=int8 vs openvino")])
    assert lines == ["- edsr_baseline_x2 at 3x, data-aware vs latency planner on torch: speed-up 3.10x vs 3.20x, "
                     "MACs / 6.20 vs 6.40, loss 0.050 vs 0.080 dB (0.030 dB less lost); before fine-tuning 1.500 vs "
                     "2.000 dB."]


def test_the_runtime_gain_is_the_baseline_on_that_runtime_against_eager():
    lines = frontier.gain_lines([_p(BASELINE, 3.0, 3.2, 0.30), _p(BASELINE, 3.0, 3.9, 0.10, backend="openvino")])
    assert lines == ["- edsr_baseline_x2 at 3x, latency planner on openvino vs latency planner on torch: speed-up "
                     "3.90x vs 3.20x, MACs / 7.80 vs 6.40, loss 0.100 vs 0.300 dB (0.200 dB less lost)."]


def test_a_refinement_that_loses_more_is_not_called_better():
    lines = frontier.gain_lines([_p(BASELINE, 5.0, 3.9, 0.365), _p("multi-stage", 5.0, 4.1, 0.379),
                                 _p("data-aware", 5.0, 4.5, 0.365)])
    assert "(0.014 dB more lost)" in lines[0] and "better" not in lines[0]
    assert "(the same loss)" in lines[1]


def test_stacked_points_read_the_pipelines_cross_precision_rows():
    speed = SimpleNamespace(speedup=9.5, interval=(9.1, 9.9), noise=[])
    res = SimpleNamespace(config=SimpleNamespace(report_backends=("openvino:precision=bf16", "openvino:precision=int8")),
                          speeds={"openvino:precision=bf16 vs openvino": speed},
                          quality={"original": {"psnr": 33.4}, "compressed@openvino:precision=bf16": {"psnr": 33.3}})
    base = _p(BASELINE, 3.0, 3.9, 0.08, backend="openvino")
    bf16, int8 = frontier.stacked_points(res, base)
    assert (bf16.approach, bf16.backend, bf16.speedup) == ("latency planner + bf16", "openvino:precision=bf16 vs openvino",
                                                           9.5)
    assert bf16.loss_db == pytest.approx(0.1) and bf16.failed is None
    assert int8.failed == "openvino:precision=int8: not timed here"


def test_bf16_is_stacked_only_where_the_cpu_runs_it(monkeypatch):
    monkeypatch.setattr(frontier, "cpu_has", lambda *flags: False)
    edsr, dncnn, srmd = frontier.FULL
    assert frontier.stacked_backends("openvino", edsr, BASELINE) == ("openvino:precision=int8",)
    monkeypatch.setattr(frontier, "cpu_has", lambda *flags: True)
    assert frontier.stacked_backends("openvino", edsr, BASELINE) == ("openvino:precision=bf16", "openvino:precision=int8")
    assert frontier.stacked_backends("torch", edsr, BASELINE) == () == frontier.stacked_backends("openvino", dncnn, BASELINE)
    assert frontier.stacked_backends("openvino", edsr, "data-aware") == ()       # stacked on one approach only
    assert frontier.stacked_backends("openvino", srmd, "data-aware") == ("openvino:precision=bf16",
                                                                        "openvino:precision=int8")


def test_quick_run_measures_every_approach_and_writes_the_figure(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    section = load_section("frontier")
    text = section.run(quick=True, figure_dir=tmp_path / "figures")
    assert text.startswith(f"## {frontier.TITLE}") and "![frontier](figures/frontier.png)" in text
    assert (tmp_path / "figures" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for approach in frontier.APPROACHES:
        assert f"| edsr_baseline_x2 | {approach} | 3x | torch |" in text
    assert "| edsr_baseline_x2 | latency planner | 3x | openvino |" in text
    assert "| edsr_baseline_x2 | latency planner + int8 | 3x | openvino:precision=int8 vs openvino |" in text
    assert "FAILED" not in text


def test_a_section_without_a_figure_directory_writes_no_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = Results(True, [_p(BASELINE, 3.0, 3.1, 0.05)], {"threads": 1}, {})
    section = frontier.SECTION.__class__("frontier", frontier.TITLE, lambda quick: fake, frontier.render,
                                         figures=frontier.figures)
    assert section.run(True).startswith("## ") and not any(tmp_path.iterdir())
    section.run(True, figure_dir=tmp_path / "f")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["frontier.png"]


def test_srmd_is_drawn_beside_edsr_with_each_line_named_by_its_model(monkeypatch):
    drawn = {}
    monkeypatch.setattr(frontier, "frontier_figure", lambda pts, refs, **kw: drawn.setdefault(kw["title"], pts) and b"")
    points = [_p(BASELINE, 3.0, 3.1, 0.2), _p("data-aware", 3.0, 3.0, 0.5, model="srmd_x2", backend="openvino"),
              _p(BASELINE, 3.0, 3.4, 0.09, model="dncnn")]
    assert sorted(frontier.figures(Results(False, points, {"threads": 2}, {}))) == ["frontier", "frontier_dncnn"]
    shared = next(pts for title, pts in drawn.items() if "SRMD" in title)
    assert {p["group"] for p in shared} == {"EDSR: latency planner (eager)", "SRMD: data-aware (openvino)"}
    alone = next(pts for title, pts in drawn.items() if "DnCNN" in title)
    assert {p["group"] for p in alone} == {"latency planner (eager)"}


def test_each_measured_model_gets_its_own_pareto_figure():
    points = [_p(BASELINE, 3.0, 3.1, 0.2), _p(BASELINE, 3.0, 3.4, 0.09, model="dncnn"),
              _p("data-aware", 3.0, 3.2, 0.05, model="dncnn"),
              Point("dncnn", "multi-stage", 3.0, failed="RuntimeError: boom")]
    r = Results(False, points, {"threads": 2}, {})
    drawn = frontier.figures(r)
    assert sorted(drawn) == ["frontier", "frontier_dncnn"]

    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in drawn.values())
    text = frontier.render(r)
    assert "![frontier](figures/frontier.png)" in text and "![frontier_dncnn](figures/frontier_dncnn.png)" in text
    only_failed = Results(False, [points[-1]], {"threads": 2}, {})
    assert frontier.figures(only_failed) == {} and "![" not in frontier.render(only_failed)
