"""The frontier section (issue 15, part 5): every approach runs through the pipeline, targets are
judged by the interval's lower edge and the loss bound, gains are against the single-stage baseline."""
import pytest

from benchmarks import frontier, load_section
from benchmarks.frontier import BASELINE, INT8, Point, Results


def _p(approach, request, speed, loss, model="edsr_baseline_x2", lo=None, before=None, backend="torch"):
    return Point(model, approach, request, backend=backend, speedup=speed, interval=(lo or speed * 0.98, speed * 1.02),
                 loss_db=loss, loss_before_db=before, macs_reduction=2 * speed)


def test_targets_are_met_only_by_a_point_inside_both_bounds():
    points = [_p(BASELINE, 5.0, 5.3, 0.20), _p("multi-stage", 5.0, 5.2, 0.14, lo=5.05),
              _p(BASELINE, 3.0, 3.2, 0.06), _p("data-aware", 3.0, 3.1, 0.04, lo=2.95),
              _p(INT8, 3.0, 4.4, 0.13, backend="onnxruntime")]
    lines = frontier.target_lines(points)
    assert lines[0].startswith("- edsr_baseline_x2: >= 5x at <= 0.15 dB (eager): met by multi-stage (5.20x, 0.140 dB)")
    assert "single-stage weight proxy at 5x: 5.30x, 0.200 dB" in lines[0]
    assert "**MISSED**" in lines[1]                        # 0.04 dB, but the interval reaches below 3x
    assert lines[-1].startswith("- ONNX Runtime with int8 stacked >= 6x against dense fp32: **MISSED**")


def test_gains_are_reported_against_the_same_request_baseline():
    lines = frontier.gain_lines([_p(BASELINE, 3.0, 3.2, 0.08, before=2.0), _p("data-aware", 3.0, 3.1, 0.05, before=1.5),
                                 _p(INT8, 3.0, 4.0, 0.1, backend="onnxruntime")])
    assert lines == ["- edsr_baseline_x2 at 3x, data-aware vs latency planner: speed-up 3.10x vs 3.20x, loss 0.050 "
                     "vs 0.080 dB (0.030 dB less lost); before fine-tuning 1.500 vs 2.000 dB."]


def test_a_refinement_that_loses_more_is_not_called_better():
    lines = frontier.gain_lines([_p(BASELINE, 5.0, 3.9, 0.365), _p("multi-stage", 5.0, 4.1, 0.379),
                                 _p("data-aware", 5.0, 4.5, 0.365)])
    assert "(0.014 dB more lost)" in lines[0] and "better" not in lines[0]
    assert "(the same loss)" in lines[1]


def test_quick_run_measures_every_approach_and_writes_the_figure(tmp_path):
    pytest.importorskip("onnxruntime")
    section = load_section("frontier")
    text = section.run(quick=True, figure_dir=tmp_path / "figures")
    assert text.startswith(f"## {frontier.TITLE}") and "![frontier](figures/frontier.png)" in text
    assert (tmp_path / "figures" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for approach in (*frontier.APPROACHES, INT8):
        assert f"| edsr_baseline_x2 | {approach} | 3x |" in text
    assert "FAILED" not in text


def test_a_section_without_a_figure_directory_writes_no_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = Results(True, [_p(BASELINE, 3.0, 3.1, 0.05)], {"threads": 1}, {})
    section = frontier.SECTION.__class__("frontier", frontier.TITLE, lambda quick: fake, frontier.render,
                                         figures=frontier.figures)
    assert section.run(True).startswith("## ") and not any(tmp_path.iterdir())
    section.run(True, figure_dir=tmp_path / "f")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["frontier.png"]


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
