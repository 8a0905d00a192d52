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
    torch_points = [p for p in curve["points"] if p["group"] == "torch"]
    assert torch_points[0] == {"group": "torch", "speedup": 1.0, "loss": 0.0}
    assert torch_points[1]["speedup"] == pytest.approx(demo["speedup"]) and torch_points[1]["loss"] == pytest.approx(loss)
    assert curve["references"] and (out / "figures" / "frontier.png").is_file()


def test_demo_rejects_a_bad_target_before_any_work(tmp_path, capsys):
    assert cli.main(["demo", "--speedup", "0.5", "-o", str(tmp_path / "d")]) == 2
    assert "speedup" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
