import pytest
import torch
from torch import nn

import convfactor
from convfactor import models
from convfactor.methods.base import Factorized


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_compress_never_modifies_the_input_model():
    model = models.get("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd",
                                                     "macs_ratio": 0.5}], x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, Factorized) for m in model.modules())
    assert any(isinstance(m, Factorized) for m in compressed.modules())
    assert compressed(x).shape == model(x).shape


def test_unselected_layers_stay_bit_identical_and_rules_override():
    model = models.get("resnet20").eval()
    rules = [{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 4},
             {"op_names": ["layer3.*"], "method": "channel_svd", "energy": 0.7},
             {"op_names": ["layer1.*"], "exclude": True}]
    compressed, report = convfactor.compress(model, rules, torch.randn(1, 3, 32, 32))
    names = {L.name for L in report.compressed}
    assert not any(n.startswith("layer1.") for n in names)
    for name, mod in model.named_modules():
        if name.startswith("layer1.") and isinstance(mod, nn.Conv2d):
            assert _params_equal(mod, compressed.get_submodule(name))
    assert torch.equal(model.fc.weight, compressed.fc.weight)
    by_name = {L.name: L for L in report.compressed}
    assert by_name["layer2.0.conv1"].ranks == (4,)
    assert by_name["layer3.0.conv1"].ranks != (4,)


def test_report_numbers():
    model = models.get("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    compressed, report = convfactor.compress(model, [{"op_names": ["layer2.1.conv1"], "method": "channel_svd",
                                                     "rank": 32}], x)
    (layer,) = report.compressed
    assert layer.params_before == 32 * 32 * 9
    assert layer.macs_before == 16 * 16 * 32 * 32 * 9
    assert layer.weight_error < 1e-6 and layer.output_error < 1e-5   # full rank
    assert torch.allclose(compressed(x), model(x), atol=1e-4)
    assert "layer2.1.conv1" in report.table()


def test_unsupported_layer_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))   # depthwise: full rank 1
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 1}],
                                             torch.randn(1, 3, 12, 12))
    skipped = {L.name: L.skipped for L in report.skipped}
    assert "nothing to factorize" in skipped["1"]
    assert compressed[1] is not model[1] and _params_equal(compressed[1], model[1])


@pytest.mark.parametrize("rules, match", [
    ([{"op_names": ["nope.*"], "method": "channel_svd", "rank": 2}], "selects no layer"),
    ([{"method": "magic", "rank": 2}], "unknown method"),
    ([{"method": "channel_svd"}], "exactly one"),
    ([{"method": "channel_svd", "rank": 0}], "positive"),
    ([{"method": "channel_svd", "rank": 999}], "out of range"),
    ([{"method": "channel_svd", "macs_ratio": 1.5}], r"\(0, 1\]"),
])
def test_bad_rules_fail_clearly(rules, match):
    with pytest.raises(ValueError, match=match):
        convfactor.compress(models.get("resnet20"), rules, torch.randn(1, 3, 32, 32))


def test_count_matches_hand_computed():
    layer = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    c = convfactor.count(layer, torch.randn(1, 3, 10, 10))
    conv_macs = 10 * 10 * 8 * 3 * 9
    lin_macs = 800 * 5
    assert c["macs"] == conv_macs + lin_macs and c["flops"] == 2 * c["macs"]
    assert c["layers"]["0"]["macs"] == conv_macs and c["layers"]["3"]["macs"] == lin_macs
    assert c["params"] == 8 * 27 + 8 + 800 * 5 + 5


# ------------------------------------------------------------------ issue 23: energy targets under the speed bound
def test_an_energy_target_never_raises_a_layers_macs():
    """The README's quick start: tucker2 at energy=0.9 on resnet20 wanted ranks for layer2.0.conv1 that
    cost more MACs than the dense conv (1.18M -> 1.24M); that layer now stays dense, with the reason."""
    model = models.get("resnet20")
    rules = [{"op_types": ["Conv2d"], "method": "tucker2", "energy": 0.9},
             {"op_names": ["layer3.*"], "method": "cp", "rank": 32},
             {"op_names": ["conv1"], "exclude": True}]
    compressed, report = convfactor.compress(model, rules, torch.randn(1, 3, 32, 32))
    energy_layers = [L for L in report.layers if not L.name.startswith("layer3.")]
    assert all(L.macs_after < L.macs_before for L in energy_layers if L.skipped is None)
    by_name = {L.name: L for L in report.layers}
    reason = by_name["layer2.0.conv1"].skipped
    assert reason is not None and "energy=0.9" in reason and "kept dense" in reason and "rank=" in reason
    assert by_name["layer2.0.conv1"].macs_after == by_name["layer2.0.conv1"].macs_before
    assert isinstance(compressed.layer2[0].conv1, nn.Conv2d) and not isinstance(compressed.layer2[0].conv1, Factorized)
    assert len(report.compressed) > 6          # the layers whose energy ranks do cut MACs are factorized


def test_energy_one_stays_an_exact_factorization():
    model = models.get("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    compressed, report = convfactor.compress(model, [{"op_names": ["layer2.1.conv1"], "method": "channel_svd",
                                                     "energy": 1.0}], x)
    (layer,) = report.compressed
    assert layer.output_error < 1e-5


def test_keep_dense_layers_are_reported_with_their_reason():
    model = models.get("resnet20").eval()
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 2}],
                                             torch.randn(1, 3, 32, 32), keep_dense={"conv1": "mine", "fc": "unselected"})
    by_name = {L.name: L for L in report.layers}
    assert by_name["conv1"].skipped == "mine" and by_name["conv1"].macs_before > 0
    assert "fc" not in by_name                                          # no rule selects it: not reported
    assert _params_equal(model.conv1, compressed.conv1)
