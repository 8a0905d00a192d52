"""`convfactor demo --quick`: the whole pipeline (shipped SR weights, plan, compress, distillation
fine-tuning, held-out quality, timing, report) in a tiny configuration."""
import json

import pytest

from convfactor import cli, models


def test_demo_quick_writes_a_consistent_report(tmp_path, capsys):
    if "edsr_baseline_x2" not in models.pretrained_names():
        pytest.fail("the shipped EDSR-baseline x2 weights (convfactor/weights/edsr_baseline_x2.safetensors) are missing")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--threads", "1", "-o", str(out)]) == 0
    for name in ("report.json", "report.md", "report.html", "demo.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    demo = json.loads((out / "demo.json").read_text())
    rows = {r["label"]: r for r in demo["summary"]}
    orig, tuned = rows["original"], rows["compressed + fine-tuned"]
    assert tuned["params"] < orig["params"] and tuned["macs"] < orig["macs"]
    assert demo["macs"]["compressed"] == tuned["macs"] and demo["params"]["original"] == orig["params"]
    assert report["speed"]["speedup"] == pytest.approx(demo["speedup"]) and demo["speedup"] > 0
    assert len(demo["finetune_loss"]) == 3
    assert "bicubic" in rows and 10 < rows["bicubic"]["psnr"] < 60
    assert "MACs budget" in demo["plan_kind"]                  # --quick does not time a latency plan
    printed = capsys.readouterr().out
    assert "measured speed-up" in printed and "QUICK" in report["title"]
    curve = report["frontier"]                                 # speed-up vs loss, one line per timed back-end
    loss = orig["psnr"] - tuned["psnr"]
    assert {p["group"] for p in curve["points"]} >= {"torch", "onnxruntime", "openvino"}
    planned_on = demo["config"]["backend"]
    assert planned_on == "openvino"                            # the default where OpenVINO is installed
    points = [p for p in curve["points"] if p["group"] == planned_on]
    assert points[0] == {"group": planned_on, "speedup": 1.0, "loss": 0.0}
    assert points[1]["speedup"] == pytest.approx(demo["speedup"]) and points[1]["loss"] == pytest.approx(loss)
    assert curve["references"] and (out / "figures" / "frontier.png").is_file()
    # issue 23: the report opens with its answer: the verdict, the loss against the quality bar, where
    answer = report["answer"]
    assert answer[0].split(":")[0] in ("target met", "TARGET MISSED", "NOT CONFIRMED", "SLOWER THAN THE ORIGINAL")
    assert answer[1].startswith(f"PSNR-Y lost on the held-out photos: {loss:.3f} dB")
    assert answer[1].endswith("quality bar 0.15 dB: " + ("met" if loss <= 0.15 else "**MISSED**"))
    assert answer[2].startswith("measured on openvino, batch 1, input [1, 3, 24, 24], 1 threads, malloc=")
    html = (out / "report.html").read_text()
    assert html.index("id='answer'") < html.index("<table") and html.index("id='speed'") < html.index("id='layers'")
    assert answer[1] in printed


def test_the_quality_bar_is_judged_on_the_measured_loss():
    from types import SimpleNamespace

    from convfactor.recipes.demo import answer_lines
    speed = SimpleNamespace(env={"threads": 2, "malloc": "default", "cpu": "x"}, speedup=3.2, interval=(3.1, 3.3))
    result = SimpleNamespace(task="sr", speed=speed, speeds={"openvino": speed}, shipped="compressed",
                             verdict=SimpleNamespace(line="target met: 3.20x"), example=SimpleNamespace(shape=(1, 3, 8, 8)),
                             config=SimpleNamespace(backend="openvino"))
    rows = [{"psnr": 33.40}, {}, {"psnr": 33.21}]
    assert answer_lines(result, rows, 0.15)[1].endswith("(33.400 -> 33.210 dB); quality bar 0.15 dB: **MISSED**")
    assert answer_lines(result, rows, 0.2)[1].endswith("quality bar 0.2 dB: met")
    assert len(answer_lines(result, rows)) == 3       # no other back-end, and no allocator caveat off eager


def test_demo_rejects_a_bad_target_before_any_work(tmp_path, capsys):
    assert cli.main(["demo", "--speedup", "0.5", "-o", str(tmp_path / "d")]) == 2
    assert "speedup" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
