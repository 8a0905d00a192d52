"""issue 23: a built-in name means its shipped weights (random weights only when asked, or said aloud
when there are none), and where the weights came from is recorded."""
import argparse

import pytest
import torch

from convfactor import cli, models
from convfactor.commands.common import load_model, random_weights_note, use_shipped_weights, weights_source
from convfactor.files import file_sha256


def _args(model, **kw):
    base = dict(model=model, weights=None, pretrained=False, random_init=False, trust_pickle=False, input_size=None)
    return argparse.Namespace(**{**base, **kw})


def test_a_name_with_shipped_weights_loads_them_by_default():
    model, _ = load_model(_args("dncnn"))
    shipped = models.get("dncnn", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shipped.state_dict().values()))
    random, _ = load_model(_args("dncnn", random_init=True))
    assert not torch.equal(next(iter(random.state_dict().values())), next(iter(shipped.state_dict().values())))


def test_the_source_of_the_weights_is_named(tmp_path):
    args = _args("dncnn")
    load_model(args)
    digest = file_sha256(models.WEIGHTS_DIR / "dncnn.safetensors")
    assert args.weights_source == f"shipped:dncnn@sha256={digest}"
    args = _args("dncnn", random_init=True)
    load_model(args)
    assert args.weights_source == "random-init:seed=0"
    assert weights_source("resnet20", None, False) == "random-init:seed=0"


def test_a_name_without_shipped_weights_says_its_weights_are_random(capsys):
    assert use_shipped_weights(_args("resnet20")) is False
    load_model(_args("resnet20"))
    assert capsys.readouterr().err.startswith("note: resnet20 has no shipped weights: random initialisation")
    assert random_weights_note(_args("resnet20", weights="w.safetensors"), False) is None   # the user's come next
    assert random_weights_note(_args("resnet20", random_init=True), False) is None          # asked for
    assert random_weights_note(_args("dncnn"), True) is None


def test_contradicting_flags_are_one_line_and_exit_2(capsys):
    assert cli.main(["evaluate", "dncnn", "--pretrained", "--random-init"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained and --random-init" in err[0]


def test_evaluate_of_a_built_in_name_scores_the_shipped_weights(capsys):
    """The new user's `convfactor evaluate edsr_baseline_x2` reported 14.6 dB (random weights)."""
    assert cli.main(["evaluate", "edsr_baseline_x2", "--input-size", "1x3x32x32"]) == 0
    mean = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mean")][0]
    assert float(mean.split()[1]) > 30


def test_a_plan_made_on_shipped_weights_is_refused_on_random_ones(tmp_path, capsys):
    plan_file = tmp_path / "p.yaml"
    assert cli.main(["plan", "dncnn", "--target", "macs=50%", "--criterion", "budget", "-o", str(plan_file)]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["compress", "dncnn", "--random-init", "--plan", str(plan_file), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this plan was made for weights shipped:dncnn@sha256=" in err[0]
    assert "not random-init:seed=0" in err[0] and not out.exists()
    assert cli.main(["compress", "dncnn", "--plan", str(plan_file), "-o", str(out)]) == 0
    import json
    recorded = json.loads((out / "recipe.json").read_text())["metadata"]["weights_source"]
    assert recorded.startswith("shipped:dncnn@sha256=")


def test_compress_refuses_a_plan_that_missed_its_request_unless_accepted(tmp_path, capsys):
    from convfactor.rank import LayerPlan, Plan
    from convfactor.rank.planfile import PlanSummary
    plan = Plan(layers=[LayerPlan(name="layer1.0.conv1", method="channel_svd", ranks=[4], criterion="latency")],
                criterion="latency", target={"speedup": 2.0}, model="resnet20",
                summary=PlanSummary(requested_speedup=2.0, speedup_band=(1.9, 2.1), measured_speedup=1.1,
                                    reachable=False, message="speedup=2x is unreachable here"))
    plan_file = plan.save(tmp_path / "p.yaml")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["compress", "resnet20", "--plan", str(plan_file), "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and "measured 1.10x against a 2x request" in err[0] and "--accept-unreachable" in err[0]
    assert not out.exists()
    assert cli.main(["compress", "resnet20", "--plan", str(plan_file), "--accept-unreachable", "-o", str(out)]) == 0
    for flag in ([], ["--no-merge"]):
        assert cli.main(["compress", "resnet20", "--plan", str(plan_file), *flag, "-o", str(tmp_path / "o2"),
                         "--overwrite"]) == 2
