"""Safe surgery: layers whose parent reads them, Conv/Linear subclasses, a failing layer, unreachable
whole-model targets, capture passes that leave the caller's input alone, and Linear MACs per token.

Third-party models come from tests/thirdparty.py (random init, tiny inputs, float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convfactor
import thirdparty
from convfactor.compression.api import capture_layer_io
from convfactor.compression.calibration import collect_inputs
from convfactor.compression.inspect import inspect_model
from convfactor.compression.surgery import candidate_layers, parse_rules, select
from convfactor.methods.base import Factorized
from convfactor.methods.channel_svd import ChannelSVD
from convfactor.spec.convspec import UnsupportedLayer

FULL = {"op_types": ["default"], "method": "channel_svd", "energy": 1.0}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _skips(report) -> dict[str, str]:
    return {L.name: L.skipped for L in report.skipped}


# ---------------------------------------------------------------- parents that read their children
def _small_vit(tv):
    return tv.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                       mlp_dim=16, num_classes=4).double().eval()


def test_vit_multihead_attention_out_proj_is_skipped_and_the_rest_is_exact():
    tv = thirdparty.load("torchvision")
    model = _small_vit(tv)
    nn.init.normal_(model.heads.head.weight)              # torchvision zero-initialises the head
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    rules = [{"op_types": ["Linear"], "method": "linear_svd", "energy": 1.0},
             {"op_types": ["Conv2d"], "method": "channel_svd", "energy": 1.0}]
    compressed, report = convfactor.compress(model, rules, x)
    skipped = _skips(report)
    out_projs = [n for n in skipped if n.endswith("self_attention.out_proj")]
    assert len(out_projs) == 2 and all("MultiheadAttention reads out_proj.weight" in skipped[n] for n in out_projs)
    assert len(report.compressed) == 2 * 2 + 2              # the MLPs, the head and the patch conv
    assert _rel(compressed(x), model(x)) < 1e-10
    # without an example input only the up-front case is known, and the report says the check did not run
    compressed, report = convfactor.compress(model, rules)
    assert set(_skips(report)) == set(out_projs)
    assert any("parent check did not run" in note for note in report.notes)
    assert "out_proj" not in " ".join(candidate_layers(model))


class _ReadsWeight(nn.Module):
    """Calls ``F.linear`` with its child's parameters instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.mlp = nn.Linear(6, 6)

    def forward(self, x):
        return self.mlp(F.linear(x, self.proj.weight, self.proj.bias))


class _BranchesOnType(nn.Module):
    """Reads nothing of its child, but takes another path once the child is no longer a Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x) if isinstance(self.fc, nn.Linear) else -x


def test_a_parent_reading_a_childs_weight_is_found_without_a_list_of_names():
    model = nn.Sequential(_ReadsWeight(), _BranchesOnType(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    compressed, report = convfactor.compress(model, [{"method": "linear_svd", "energy": 1.0}], x)
    skipped = _skips(report)
    assert set(skipped) == {"0.proj", "1.fc"}
    assert "`0` (_ReadsWeight) reads .weight of this layer directly" in skipped["0.proj"]
    assert "its parent `1` (_BranchesOnType) does not give the same output" in skipped["1.fc"]
    assert {L.name for L in report.compressed} == {"0.mlp", "2"}
    assert _rel(compressed(x), model(x)) < 1e-12


def test_spandrel_span_reparameterized_blocks_are_skipped_and_compress_completes():
    spandrel = thirdparty.load("spandrel")
    from spandrel.architectures.SPAN import SPAN
    del spandrel
    model = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=4, upscale=2).double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd",
                                                      "energy": 1.0}], x)
    skipped = _skips(report)
    assert "`block_1.c1_r` (Conv3XC) reads .weight of this layer directly" in skipped["block_1.c1_r.conv.0"]
    assert all(n in skipped for n in ("conv_1.sk", "conv_1.eval_conv", "block_6.c3_r.conv.2"))
    assert report.compressed                                  # the plain convs (conv_cat, upsampler)
    assert _rel(compressed(x), model(x)) < 1e-10


# ---------------------------------------------------------------- Conv/Linear subclasses
def test_timm_conv2d_same_is_exact_at_full_rank_at_two_input_sizes_and_round_trips(tmp_path):
    timm = thirdparty.load("timm")
    model = timm.create_model("tf_efficientnet_b0", num_classes=4).double().eval()
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) >= 5
    x = torch.randn(1, 3, 33, 37, dtype=torch.float64)
    for method in ("channel_svd", "tucker2"):
        compressed, report = convfactor.compress(model, [{"op_types": ["Conv2dSame"], "method": method,
                                                          "energy": 1.0}], x)
        done = {L.name for L in report.compressed}
        assert {n for n in same if model.get_submodule(n).groups == 1} <= done
        for size in ((33, 37), (40, 28)):                   # odd and even sizes: different SAME pads
            y = torch.randn(1, 3, *size, dtype=torch.float64)
            assert _rel(compressed(y), model(y)) < 1e-10
    convfactor.save(compressed, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", model)
    y = torch.randn(1, 3, 29, 30, dtype=torch.float64)
    assert torch.equal(loaded(y), compressed(y))


@pytest.mark.parametrize("method, target", [("channel_svd", {"energy": 1.0}), ("spatial_svd", {"energy": 1.0}),
                                            ("tucker2", {"energy": 1.0}), ("cp", {"rank": 24}),
                                            ("depthwise", {"energy": 1.0}), ("lowrank_sparse", {"rank": (5, 2)})])
def test_each_method_carries_the_dynamic_same_padding(method, target):
    """Exact at full rank (ADMM-fitted lowrank_sparse to 1e-6) at odd and even sizes: a wrong pad
    would be an O(1) error."""
    timm = thirdparty.load("timm")
    from timm.layers import Conv2dSame
    layer = Conv2dSame(4, 5, 3, stride=2, dilation=1).double()
    new = convfactor.factorize(layer, method, **target)
    for size in ((9, 10), (12, 7)):
        x = torch.randn(2, 4, *size, dtype=torch.float64)
        assert _rel(new(x), layer(x)) < 1e-6
    del timm


def test_a_method_that_pads_by_itself_skips_conv2d_same_with_a_reason():
    thirdparty.load("timm")
    from timm.layers import Conv2dSame
    model = nn.Sequential(Conv2dSame(4, 6, 3, stride=2), nn.Conv2d(6, 6, 3)).double()
    x = torch.randn(1, 4, 11, 11, dtype=torch.float64)
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "basis", "rank": 2}], x)
    assert "dynamic 'SAME' padding" in _skips(report)["0"] and [L.name for L in report.compressed] == ["1"]
    assert torch.equal(compressed(x)[:0], model(x)[:0]) and compressed[0] is not model[0]


def test_timm_std_conv2d_is_skipped_with_a_reason():
    thirdparty.load("timm")
    from timm.layers import StdConv2d
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).double()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    compressed, report = convfactor.compress(model, [FULL], x)
    assert "StdConv2d overrides Conv2d.forward" in _skips(report)["0"]
    assert [L.name for L in report.compressed] == ["2"] and "0" not in candidate_layers(model)
    assert _rel(compressed(x), model(x)) < 1e-12
    with pytest.raises(UnsupportedLayer, match="StdConv2d"):
        convfactor.factorize(model[0], "channel_svd", rank=2)


def test_op_types_match_subclasses_r3d_conv3dsimple():
    tv = thirdparty.load("torchvision")
    model = tv.models.video.r3d_18(num_classes=4)
    chosen = select(model, parse_rules([{"op_types": ["Conv3d"], "method": "tucker2", "energy": 0.9}]))
    kinds = {type(model.get_submodule(n)).__name__ for n in chosen}
    assert len(chosen) == 20 and kinds == {"Conv3d", "Conv3DSimple"}


# ---------------------------------------------------------------- one layer never aborts the model
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_sized_linear_is_skipped_and_tt_compresses_the_rest():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(2, 0)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    assert list(candidate_layers(model)) == ["0", "1"]
    compressed, report = convfactor.compress(model, [{"op_types": ["Linear"], "method": "tt", "rank": 2}], x)
    assert "zero-sized" in _skips(report)["2"] and "0" in {L.name for L in report.compressed}
    assert compressed(x).shape == (3, 0)
    plan = convfactor.plan(model, x, target={"macs": 0.5})          # the planner lists candidates too
    assert "2" not in {layer.name for layer in plan.layers}


def test_a_method_raising_on_one_layer_skips_that_layer(monkeypatch):
    original = ChannelSVD.factorize

    def fails_on_wide(self, weight, spec, ranks, **kw):
        if spec.in_channels == 8:
            raise RuntimeError("LAPACK did not converge")
        return original(self, weight, spec, ranks, **kw)
    monkeypatch.setattr(ChannelSVD, "factorize", fails_on_wide)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)).double()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    # merge=False: merging would fold the full-rank factor pair of layer 0 back into one conv (fewer MACs)
    compressed, report = convfactor.compress(model, [FULL], x, merge=False)
    skipped = _skips(report)
    assert set(skipped) == {"1", "2"} and "RuntimeError: LAPACK did not converge" in skipped["1"]
    assert isinstance(compressed[0], Factorized) and _rel(compressed(x), model(x)) < 1e-12


def test_an_unreachable_whole_model_target_skips_the_layer_an_explicit_one_fails():
    tv = thirdparty.load("torchvision")
    model = tv.models.mobilenet_v3_small(num_classes=4).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    compressed, report = convfactor.compress(model, [{"op_types": ["Conv2d"], "method": "spatial_svd",
                                                      "macs_ratio": 0.5}], x)
    unreachable = {n: r for n, r in _skips(report).items() if "macs_ratio=0.5 is unreachable" in r}
    assert "features.1.block.0.0" in unreachable                    # a depthwise 3x3
    assert all(model.get_submodule(n).groups > 1 for n in unreachable)
    assert len(report.compressed) > 20 and report.warning is None
    with pytest.raises(ValueError, match=r"^features\.1\.block\.0\.0: spatial_svd: macs_ratio=0\.5 is unreachable"):
        convfactor.compress(model, [{"op_names": ["features.1.block.0.0"], "method": "spatial_svd",
                                     "macs_ratio": 0.5}], x)


def test_a_module_used_at_two_places_is_skipped():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared).double()
    _, report = convfactor.compress(model, [FULL], torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert "used at several places" in _skips(report)["0"]


# ---------------------------------------------------------------- the caller's input, and counts
class _ScalesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x *= 255.0                      # as RCAN's input scaling
        return self.conv(x)


def test_capture_passes_never_modify_the_callers_input():
    model = _ScalesInPlace().double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    before = x.clone()
    convfactor.compress(model, [{"method": "channel_svd", "energy": 1.0, "data_aware": True}], x, calibration=x)
    capture_layer_io(model, ["conv"], x)
    collect_inputs(model, ["conv"], [x, (x,)])
    inspect_model(model, x)
    convfactor.count(model, x)
    assert torch.equal(x, before)


def test_report_counts_linear_macs_per_token_like_count():
    timm = thirdparty.load("timm")
    tv = thirdparty.load("torchvision")
    from torchvision.models.convnext import CNBlockConfig
    for model in (timm.create_model("test_convnext", num_classes=4),
                  tv.models.convnext.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4)):
        model = model.double().eval()
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        compressed, report = convfactor.compress(model, [{"op_types": ["Linear"], "method": "linear_svd",
                                                          "energy": 1.0}], x)
        before, after = convfactor.count(model, x)["layers"], convfactor.count(compressed, x)["layers"]
        mlp = [L for L in report.layers if "mlp" in L.name or "block" in L.name]
        assert mlp and all(L.macs_before == before[L.name]["macs"] for L in report.layers)
        for L in report.compressed:
            assert L.macs_after == sum(v["macs"] for k, v in after.items() if k.startswith(L.name + "."))
        facts = {f["name"]: f for f in inspect_model(model, x)}
        assert all(facts[L.name]["macs"] == L.macs_before for L in report.layers)


def test_inspect_refuses_nan_weights_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^0\.weight contains NaN or Inf values$"):
        inspect_model(model, torch.randn(1, 3, 8, 8))


class _Noisy(nn.Module):
    """Draws random numbers in eval mode: the parent check must not take that for a broken parent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x + torch.randn_like(x))


def test_a_model_drawing_random_numbers_passes_the_parent_check():
    model = nn.Sequential(_Noisy(), nn.Conv2d(4, 4, 1)).double()
    _, report = convfactor.compress(model, [FULL], torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert report.skipped == [] and len(report.compressed) == 2
