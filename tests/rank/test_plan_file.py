import json

import pytest
import torch
from torch import nn

from convfactor import models
from convfactor.cli import main
from convfactor.compression.api import compress
from convfactor.rank import LayerPlan, Plan, plan


@pytest.fixture(scope="module")
def resnet():
    return models.get("resnet20"), models.default_input("resnet20")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(resnet, tmp_path, suffix):
    model, x = resnet
    p = plan(model, x, target="macs=50%", criterion="budget", model_name="resnet20")
    path = p.save(tmp_path / f"plan{suffix}")
    q = Plan.load(path)
    assert q.to_dict() == p.to_dict()
    assert [(L.name, L.method, L.ranks) for L in q.layers] == [(L.name, L.method, L.ranks) for L in p.layers]


def test_apply_equals_compress_with_the_same_ranks(resnet):
    model, x = resnet
    p = plan(model, x, target="macs=50%", criterion="budget")
    a, report = p.apply(model, x)
    rules = [{"op_names": [L.name], "method": L.method, "rank": L.ranks[0]} for L in p.compressed]
    b, _ = compress(model, rules, x)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert {L.name for L in report.compressed} == {L.name for L in p.compressed}
    # the original is untouched
    assert all(type(m) is not type(a.layer1[0].conv1) for m in [model.layer1[0].conv1])


def test_hand_edited_plan(resnet, tmp_path):
    model, x = resnet
    p = plan(model, x, target="macs=50%", criterion="budget")
    data = p.to_dict()
    first = next(L for L in data["layers"] if L["method"])
    first["ranks"] = [3]
    second = [L for L in data["layers"] if L["method"]][1]
    second["method"], second["ranks"] = None, None            # keep dense
    path = tmp_path / "edited.yaml"
    import yaml
    path.write_text(yaml.safe_dump(data))
    compressed, report = Plan.load(path).apply(model, x)
    layers = {L.name: L for L in report.layers}
    assert layers[first["name"]].ranks == (3,)
    assert second["name"] not in layers
    assert isinstance(compressed.get_submodule(second["name"]), nn.Conv2d)


def test_bad_plans_fail_clearly(resnet, tmp_path):
    model, x = resnet
    with pytest.raises(ValueError, match="does not have"):
        Plan(layers=[LayerPlan("nope", "channel_svd", [2])]).apply(model, x)
    with pytest.raises(ValueError, match="needs ranks"):
        LayerPlan("conv1", "channel_svd", None)
    with pytest.raises(ValueError, match="out of range"):
        Plan(layers=[LayerPlan("layer1.0.conv1", "channel_svd", [999])]).apply(model, x)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [{"name": "conv1", "rnaks": [2]}]}))
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.load(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        Plan.load(bad)
    with pytest.raises(FileNotFoundError):
        Plan().save(tmp_path / "no" / "plan.yaml")


def test_cli_plan_then_compress_with_plan(tmp_path, capsys):
    plan_file = tmp_path / "plan.yaml"
    assert main(["plan", "resnet20", "--target", "macs=40%", "--criterion", "budget", "-o", str(plan_file)]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out
    p = Plan.load(plan_file)
    assert p.criterion == "budget" and p.model == "resnet20" and p.compressed
    assert abs(p.summary["achieved_ratio"] - 0.4) <= 0.008
    out = tmp_path / "out"
    assert main(["compress", "resnet20", "--plan", str(plan_file), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    planned = {L.name: L.ranks for L in p.compressed}
    got = {L["name"]: L["ranks"] for L in report["layers"] if not L["skipped"]}
    assert got == planned


@pytest.mark.parametrize("args", [["--criterion", "vbmf", "--weakening", "0.5"],
                                  ["--criterion", "energy", "--energy", "0.95", "--round-to", "8"],
                                  ["--target", "macs=50%", "--kappa-threshold", "2.0"]])
def test_cli_other_criteria(tmp_path, capsys, args):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "resnet20", *args, "-o", str(plan_file)]) == 0
    p = Plan.load(plan_file)
    assert p.layers
    if "--round-to" in args:
        from convfactor.spec.convspec import ConvSpec
        from convfactor.methods import registry
        from convfactor.rank.criteria import below_dense
        model = models.get("resnet20")
        for L in p.compressed:
            spec = ConvSpec.from_module(model.get_submodule(L.name))
            m = registry.get(L.method)
            assert all(r % 8 == 0 or r == m.max_rank(spec)[0] for r in L.ranks) or "no multiple" in L.note
            assert below_dense(m, spec, L.ranks, L.input_shape[2:])
    if "--kappa-threshold" in args:
        for L in p.layers:
            if L.kappa is not None and L.kappa <= 2.0:
                assert L.method is None and "threshold" in L.note


def test_cli_plan_bad_target(tmp_path, capsys):
    assert main(["plan", "resnet20", "--target", "speed=3", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


# A latency plan file as the previous planner wrote it (the pipeline's 3x request with a 12% margin):
# its summary is a plain mapping, and ``requested_speedup`` holds the aim.
OLD_LATENCY_PLAN = {
    "layers": [
        {"name": "conv1", "method": None, "ranks": None, "criterion": "latency", "input_shape": [1, 3, 32, 32],
         "macs_before": 442368, "macs_after": 442368, "params_before": 432, "params_after": 432, "kappa": 4.2,
         "error": 0.0, "dense_ms": 0.41, "factorized_ms": None, "note": "no candidate is faster than the dense layer"},
        {"name": "layer1.0.conv1", "method": "channel_svd", "ranks": [3], "criterion": "latency",
         "input_shape": [1, 16, 32, 32], "macs_before": 2359296, "macs_after": 491520, "params_before": 2304,
         "params_after": 480, "kappa": 1.92, "error": 0.84, "dense_ms": 1.53, "factorized_ms": 0.32, "note": None},
    ],
    "criterion": "latency", "target": {"speedup": 3.3600000000000003}, "model": None, "input_shape": [1, 3, 32, 32],
    "memory_format": "channels_last", "environment": {}, "options": {}, "version": 1,
    "summary": {"kappa_threshold": None, "requested_speedup": 3.3600000000000003, "requested_error": None,
                "measured_speedup": 3.378, "reference_format": "channels_last", "reference_ms": 27.17,
                "plan_ms": 8.04, "predicted_speedup": 3.18, "rms_kernel_error": 0.737, "reachable": True,
                "original_ms": {"contiguous": 40.7, "channels_last": 27.17},
                "layer_time_scale": {"contiguous": 0.97, "channels_last": 0.97},
                "history": [{"iteration": 0, "memory_format": "channels_last", "aimed_speedup": 3.36,
                             "predicted_speedup": 3.39, "measured_speedup": 3.62, "rms_kernel_error": 0.75,
                             "feasible": True, "reference_ms": 27.17, "plan_ms": 7.5}],
                "macs_ratio": 0.291, "params_ratio": 0.312, "a_key_from_elsewhere": "kept"},
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_file_written_by_the_previous_planner_loads(resnet, tmp_path, suffix):
    import yaml
    model, x = resnet
    path = tmp_path / f"old{suffix}"
    path.write_text(yaml.safe_dump(OLD_LATENCY_PLAN) if suffix == ".yaml" else json.dumps(OLD_LATENCY_PLAN))
    p = Plan.load(path)
    assert p.summary.requested_speedup == pytest.approx(3.36) and p.summary.aimed_speedup is None
    assert p.summary["measured_speedup"] == 3.378 and p.summary.get("message") is None
    assert p.summary.history[0]["measured_speedup"] == 3.62
    assert p.summary["a_key_from_elsewhere"] == "kept"
    assert [(L.name, L.method, L.ranks) for L in p.compressed] == [("layer1.0.conv1", "channel_svd", [3])]
    again = Plan.from_dict(p.to_dict())
    assert again.to_dict() == p.to_dict()
    assert {k: v for k, v in p.to_dict()["summary"].items()} == {
        k: v for k, v in OLD_LATENCY_PLAN["summary"].items() if v is not None}
    compressed, report = p.apply(model, x)
    assert [L.name for L in report.compressed] == ["layer1.0.conv1"]


def test_a_plan_for_3x_records_the_request_and_the_aim_apart(resnet, tmp_path):
    from fake_timer import FakeTimer
    from convfactor.rank import LatencyConfig, Target
    model, x = resnet
    timing = LatencyConfig(timer=FakeTimer(), repeats=1, e2e_rounds=1, e2e_repeats=1, margin=0.12)
    p = plan(model, x, target=Target("speedup", 3.0), methods=("channel_svd", "linear_svd"), latency=timing)
    q = Plan.load(p.save(tmp_path / "plan.yaml"))
    for r in (p, q):
        assert r.target == {"speedup": 3.0}
        assert r.summary.requested_speedup == 3.0
        assert r.summary.aimed_speedup == pytest.approx(3.36)
        assert r.summary.speedup_band == pytest.approx((3.18, 3.54))
        assert r.summary.history[0]["aimed_speedup"] == pytest.approx(3.36)
    assert q.summary.reachable and 3.18 <= q.summary.measured_speedup <= 3.54
    assert "requested_speedup: 3" in q.table() and "aimed_speedup: 3.36" in q.table()


def test_an_all_dense_plan_applies_as_an_unchanged_copy():
    import torch
    from torch import nn

    from convfactor.rank import Plan
    from convfactor.rank.planfile import LayerPlan
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    copy, report = Plan(layers=[LayerPlan(name="0")]).apply(model, x)
    assert copy is not model and torch.equal(copy(x), model(x))
    assert report.compressed == [] and "dense" in report.notes[0]


def _latency_plan(resnet, measured: float, band=(1.9, 2.1), credit=None) -> Plan:
    """A latency plan for 2x over one real layer, its outcome set by hand."""
    from convfactor.rank.planfile import PlanSummary
    model, x = resnet
    p = Plan(layers=[LayerPlan(name="layer1.0.conv1", method="channel_svd", ranks=[4], criterion="latency")],
             criterion="latency", target={"speedup": 2.0})
    p.summary = PlanSummary(requested_speedup=2.0, speedup_band=band, measured_speedup=measured,
                            reachable=band[0] <= measured <= band[1], precision_credit=credit,
                            message=None if measured >= band[0] else "speedup=2x is unreachable here: ...")
    return p


def test_a_plan_that_measured_below_its_request_is_refused_unless_allowed(resnet):
    """issue 23: the quick start planned an unreachable 2x and applied rank 1-4 layers without a word."""
    model, x = resnet
    short = _latency_plan(resnet, measured=1.2)
    assert short.shortfall().startswith("this plan measured 1.20x against a 2x request (band 1.9-2.1x): speedup=2x")
    with pytest.raises(ValueError, match="allow_unreachable=True"):
        short.apply(model, x)
    compressed, report = short.apply(model, x, allow_unreachable=True)
    assert [L.name for L in report.compressed] == ["layer1.0.conv1"]


@pytest.mark.parametrize("measured", [2.0, 2.6])
def test_a_plan_that_reached_or_overshot_its_request_applies(resnet, measured):
    model, x = resnet
    p = _latency_plan(resnet, measured=measured)
    assert p.shortfall() is None
    assert [L.name for L in p.apply(model, x)[1].compressed] == ["layer1.0.conv1"]


def test_the_shortfall_of_a_precision_plan_is_against_the_rest_left_to_low_rank(resnet):
    p = _latency_plan(resnet, measured=1.1, band=(1.25, 1.45), credit={"low_rank_request": 1.33})
    assert "against a 1.33x request" in p.shortfall()
    assert Plan.from_dict(p.to_dict()).shortfall() == p.shortfall()          # it survives the plan file


def test_a_plan_checks_the_weights_it_was_made_for(resnet, tmp_path):
    """issue 23: a plan made on shipped weights, applied to random ones, exited 0 with a 13.8 dB model."""
    p = Plan(layers=[LayerPlan(name="conv1")], weights="shipped:edsr@sha256=" + "a" * 64)
    again = Plan.load(p.save(tmp_path / "plan.yaml"))
    assert again.weights == p.weights
    again.check_weights(p.weights)
    again.check_weights(None)                                   # nothing known about this model's weights
    with pytest.raises(ValueError, match=r"made for weights shipped:edsr@sha256=aaaaaaaaaaaa\.\.\., not random-init"):
        again.check_weights("random-init:seed=0")
    Plan(layers=[]).check_weights("random-init:seed=0")         # an old plan records none: no check
