"""Exact merging of linear chains (:mod:`convfactor.compression.merge`): every rule over strides,
paddings, dilations, padding modes, biases and odd sizes, in float64 (relative error <= 1e-10 at
several input sizes, so the bias field is right at every size); refusals with their reasons; EDSR's
tail; save / load; the compress step and its opt-out."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import convfactor
from convfactor.compression.merge import BiasFieldConv2d, MergedAway, MergeSettings, merge
from convfactor.methods.base import Factorized
from convfactor.spec.convspec import ConvSpec

TOL = 1e-10
SIZES = [(7, 9), (5, 11), (12, 8)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _check_same(before: nn.Module, after: nn.Module, channels: int, sizes=SIZES, batch: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    for size in sizes:
        x = torch.randn(batch, channels, *size, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            want, got = before(x), after(x)
        assert got.shape == want.shape
        assert _rel(got, want) <= TOL, size


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.double().eval()


def _example(channels: int, size=(6, 10)) -> torch.Tensor:
    return torch.randn(1, channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@st.composite
def _spatial(draw, allow_same: bool = True):
    """kernel, stride, dilation, padding (int / tuple / 'same' / 'valid') and padding_mode of a conv."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.sampled_from([1, 2, (1, 2)]))
    dilation = draw(st.sampled_from([1, 2, (2, 1)]))
    options = ["int", "tuple", "valid"] + (["same"] if allow_same and stride == 1 else [])
    kind = draw(st.sampled_from(options))
    padding = {"int": draw(st.integers(0, 2)), "tuple": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
               "valid": "valid", "same": "same"}[kind]
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and kind == "same" and any(k % 2 == 0 for k in kernel):
        mode = "zeros"
    return dict(kernel_size=kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)


# ---------------------------------------------------------------------------- rule 1: kxk -> 1x1
@settings(max_examples=40, deadline=None)
@given(geo=_spatial(), c_in=st.integers(1, 4), c_out=st.integers(1, 3), extra=st.integers(1, 3),
       stride_b=st.sampled_from([1, 2]), bias_a=st.booleans(), bias_b=st.booleans(), seed=st.integers(0, 99))
def test_rule1_kxk_then_1x1_is_exact(geo, c_in, c_out, extra, stride_b, bias_a, bias_b, seed):
    mid = c_out + extra                                       # fewer outputs than A has: the MACs drop
    model = _seeded(nn.Sequential(nn.Conv2d(c_in, mid, bias=bias_a, **geo),
                                  nn.Conv2d(mid, c_out, 1, stride=stride_b, bias=bias_b)), seed)
    merged, report = merge(model, _example(c_in))
    assert [g.rule for g in report.merged] in (["kxk->1x1"], ["1x1->1x1"])
    assert isinstance(merged[0], MergedAway) and type(merged[1]) is nn.Conv2d
    _check_same(model, merged, c_in)


# ---------------------------------------------------------------------------- rule 2: 1x1 -> kxk
@settings(max_examples=40, deadline=None)
@given(geo=_spatial(), c_in=st.integers(1, 3), c_out=st.integers(1, 4), extra=st.integers(1, 3),
       bias_a=st.booleans(), bias_b=st.booleans(), seed=st.integers(0, 99))
def test_rule2_1x1_then_kxk_is_exact_with_the_bias_field(geo, c_in, c_out, extra, bias_a, bias_b, seed):
    mid = c_in + 1 + extra                       # the merged conv (+ its bias field) reads fewer channels
    model = _seeded(nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=bias_a), nn.Conv2d(mid, c_out, bias=bias_b, **geo)),
                    seed)
    merged, report = merge(model, _example(c_in))
    assert [g.rule for g in report.merged] in (["1x1->kxk"], ["1x1->1x1"])
    padded = any(lo or hi for lo, hi in ConvSpec.from_module(model[1]).padding)
    assert isinstance(merged[1], BiasFieldConv2d) == (bias_a and model[1].padding_mode == "zeros" and padded)
    _check_same(model, merged, c_in)


def test_rule2_bias_field_is_right_at_every_size_and_traces():
    """The field is computed from the input's size in forward: other sizes than the example's, and
    an fx trace run at new sizes, give the same output."""
    torch.manual_seed(0)
    model = _seeded(nn.Sequential(nn.Conv2d(2, 9, 1), nn.Conv2d(9, 3, 3, padding=1)), 3)
    merged, report = merge(model, _example(2, (8, 8)))
    assert isinstance(merged[1], BiasFieldConv2d) and report.merged[0].rule == "1x1->kxk"
    _check_same(model, merged, 2, sizes=[(1, 1), (2, 3), (7, 9), (5, 11), (16, 13)])
    traced = torch.fx.symbolic_trace(merged)
    _check_same(model, traced, 2, sizes=[(4, 6), (9, 5)])
    x = torch.randn(2, 9, 7, dtype=torch.float64)                   # unbatched (C, H, W) input
    with torch.no_grad():
        assert _rel(merged(x[:2]), model(x[:2])) <= TOL


# ---------------------------------------------------------------------------- rule 3 and chains
@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 4), mid=st.integers(5, 7), stride_a=st.sampled_from([1, 2]),
       stride_b=st.sampled_from([1, 2]), bias_a=st.booleans(), bias_b=st.booleans(), seed=st.integers(0, 99))
def test_rule3_1x1_then_1x1(c, mid, stride_a, stride_b, bias_a, bias_b, seed):
    model = _seeded(nn.Sequential(nn.Conv2d(c, mid, 1, stride=stride_a, bias=bias_a),
                                  nn.Conv2d(mid, c, 1, stride=stride_b, bias=bias_b)), seed)
    merged, report = merge(model, _example(c))
    assert [g.rule for g in report.merged] == ["1x1->1x1"]
    assert merged[1].stride == (stride_a * stride_b,) * 2
    _check_same(model, merged, c)


def test_chains_merge_repeatedly_through_nested_sequentials_and_identities():
    """1x1 -> 1x1 -> 3x3 (nested, an Identity between) -> 1x1: one conv with a bias field is left."""
    model = _seeded(nn.Sequential(nn.Conv2d(2, 8, 1), nn.Sequential(nn.Conv2d(8, 8, 1), nn.Identity()),
                                  nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1))), 4)
    merged, report = merge(model, _example(2))
    convs = [type(m).__name__ for m in merged.modules() if isinstance(m, (nn.Conv2d, BiasFieldConv2d))]
    assert len(report.merged) == 3 and convs == ["BiasFieldConv2d", "Conv2d"]      # the field conv and its conv
    assert report.macs_saved > 0 and not report.skipped
    _check_same(model, merged, 2)


def test_meanshift_as_a_fixed_1x1_conv_merges():
    """Rule 5: EDSR-PyTorch's MeanShift is a frozen 1x1 Conv2d subclass; after a conv (rule 1) it
    always merges, before a conv with reflect padding too (no field); before a zero-padded one the
    bias field would cost more than the 1x1 saves, and it is left with that reason."""
    class MeanShift(nn.Conv2d):
        def __init__(self, sign):
            super().__init__(3, 3, 1)
            with torch.no_grad():
                self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                self.bias.copy_(sign * torch.tensor([0.4488, 0.4371, 0.4040]))
            self.requires_grad_(False)

    tail = _seeded(nn.Sequential(nn.Conv2d(8, 3, 3, padding=1)), 5).append(MeanShift(+1).double())
    merged, report = merge(tail, _example(8))
    assert report.merged[0].rule == "kxk->1x1" and isinstance(merged[1], nn.Conv2d)
    _check_same(tail, merged, 8)
    head = nn.Sequential(MeanShift(-1).double(), _seeded(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), 6))
    merged, report = merge(head, _example(3))
    assert report.merged[0].rule == "1x1->kxk" and type(merged[1]) is nn.Conv2d
    _check_same(head, merged, 3)
    zero = nn.Sequential(MeanShift(-1).double(), _seeded(nn.Conv2d(3, 8, 3, padding=1), 6))
    merged, report = merge(zero, _example(3))
    assert not report.merged and "MACs would rise" in report.skipped[0].reason


# ---------------------------------------------------------------------------- rule 4: sub-pixel
@settings(max_examples=40, deadline=None)
@given(r=st.sampled_from([2, 3]), k=st.sampled_from([1, 2, 3, 4, 5]), kw=st.sampled_from([1, 3]),
       mid=st.integers(6, 8), c_out=st.integers(1, 2), bias_a=st.booleans(), bias_c=st.booleans(),
       seed=st.integers(0, 99))
def test_rule4_subpixel_then_1x1_is_exact(r, k, kw, mid, c_out, bias_a, bias_c, seed):
    padding = "same" if k % 2 == 0 else (k // 2, kw // 2)
    model = _seeded(nn.Sequential(nn.Conv2d(1, r * r * mid, 1, bias=bias_a), nn.PixelShuffle(r),
                                  nn.Conv2d(mid, c_out, (k, kw), padding=padding, bias=bias_c)), seed)
    merged, report = merge(model, _example(1))
    assert [g.rule for g in report.merged] in (["subpixel+1x1->kxk"], ["subpixel+1x1->1x1"])
    assert isinstance(merged[0], MergedAway) and isinstance(merged[2], nn.PixelShuffle)
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == mid for m in merged.modules())   # no HR conv
    _check_same(model, merged, 1)


def test_rule4_subpixel_after_a_kxk_and_before_a_1x1():
    """An upsampling conv, PixelShuffle, then a 1x1 (rule 1 after the rewrite): one LR conv."""
    model = _seeded(nn.Sequential(nn.Conv2d(4, 4 * 8, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(8, 3, 1)), 7)
    merged, report = merge(model, _example(4))
    assert report.merged[0].rule == "subpixel+kxk->1x1" and merged[1].out_channels == 12
    _check_same(model, merged, 4)


@pytest.mark.parametrize("conv, reason", [
    (dict(kernel_size=3, padding=1, stride=2), "stride"),
    (dict(kernel_size=3, padding=2, dilation=2), "dilation in the HR conv"),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), "padding mode 'reflect'"),
    (dict(kernel_size=3, padding=0), "does not keep the size"),
    (dict(kernel_size=3, padding=1, groups=2), "groups"),
])
def test_rule4_refusals_say_why(conv, reason):
    model = _seeded(nn.Sequential(nn.Conv2d(1, 4 * 8, 1), nn.PixelShuffle(2), nn.Conv2d(8, 2, **conv)), 8)
    merged, report = merge(model, _example(1, (7, 9)))
    assert not report.merged and reason in report.skipped[0].reason
    assert report.skipped[0].paths == ("0", "1", "2")
    _check_same(model, merged, 1)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("a, b", [
    (nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 2, 1)),
    (nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 3, padding=1, groups=2)),
    (nn.Conv2d(4, 8, 1, groups=4), nn.Conv2d(8, 2, 3, padding=1)),
])
def test_grouped_pairs_are_skipped_with_the_reason(a, b):
    model = _seeded(nn.Sequential(a, b), 9)
    merged, report = merge(model, _example(4))
    assert not report.merged and report.skipped[0].reason.startswith("groups")
    assert type(merged[0]) is nn.Conv2d and type(merged[1]) is nn.Conv2d
    _check_same(model, merged, 4)


@pytest.mark.parametrize("a, b, reason", [
    (nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 2, 3, padding=1), "stride"),
    (nn.Conv2d(4, 8, 1, padding=1), nn.Conv2d(8, 2, 3, padding=1), "A is a 1x1 with padding"),
    (nn.Conv2d(4, 8, 3), nn.Conv2d(8, 2, 1, padding=1), "B is a 1x1 with padding"),
    (nn.Conv2d(4, 8, 3), nn.Conv2d(8, 2, 3), "kxk->kxk"),
])
def test_inexact_pairs_are_skipped_with_the_reason(a, b, reason):
    model = _seeded(nn.Sequential(a, b), 10)
    merged, report = merge(model, _example(4))
    assert not report.merged and reason in report.skipped[0].reason
    _check_same(model, merged, 4)


def test_a_merge_that_would_raise_the_macs_is_not_made():
    """A channel SVD's factor pair (3x3 16->4, 1x1 4->16) would become a dense 3x3 16->16."""
    model = _seeded(nn.Sequential(nn.Conv2d(16, 4, 3, padding=1, bias=False), nn.Conv2d(4, 16, 1)), 11)
    merged, report = merge(model, _example(16))
    (skip,) = report.skipped
    assert not report.merged and "MACs would rise" in skip.reason and skip.macs_after > skip.macs_before
    assert skip.paths == ("0", "1") and type(merged[1]) is nn.Conv2d and merged[1].in_channels == 4
    assert "MACs would rise" in report.table() and report.to_dict()["skipped"][0]["paths"] == ["0", "1"]


def test_nothing_else_may_read_the_intermediate():
    """A custom module that reads the tensor between two convs is no chain; a hook on a layer ends
    one too; a parent that calls a Sequential's child directly is caught by the output check."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y.mean(1, keepdim=True)

    class Peek(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 3, padding=1, padding_mode="reflect"))

        def forward(self, x):
            return self.seq(x) + self.seq[0](x).mean(1, keepdim=True)

    twice = _seeded(Twice(), 12)
    merged, report = merge(twice, _example(3))
    assert not report.merged and not report.skipped
    peek = _seeded(Peek(), 13)
    merged, report = merge(peek, _example(3))
    assert not report.merged and "changed the model's output" in report.skipped[0].reason and report.notes
    _check_same(peek, merged, 3)
    hooked = _seeded(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 3, padding=1, padding_mode="reflect")), 14)
    hooked[0].register_forward_hook(lambda m, args, out: None)
    merged, report = merge(hooked, _example(3))
    assert not report.merged and "hooks" in report.skipped[0].reason


def test_the_users_model_is_unchanged_unless_inplace():
    model = _seeded(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 2, 1)), 15)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged, report = merge(model, _example(2))
    assert report.merged and merged is not model and type(model[0]) is nn.Conv2d
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], v) for k, v in after.items())
    same, _ = merge(model, _example(2), inplace=True)
    assert same is model and isinstance(model[0], MergedAway)


def test_without_an_example_input_merges_at_a_nominal_size_and_says_so():
    model = _seeded(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 2, 1)), 16)
    merged, report = merge(model)
    assert report.merged and "nominal" in report.notes[0]
    _check_same(model, merged, 2)
    _, within = merge(model, settings=MergeSettings(within=("elsewhere",)))
    assert not within.merged and not within.skipped


# ---------------------------------------------------------------------------- EDSR's tail
def _edsr():
    torch.manual_seed(0)
    return convfactor.models.get("edsr_baseline_x2").double().eval()


def _hr_convs(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the convs that run at a resolution above the input's."""
    found, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: found.append(name) if out.shape[-1] > x.shape[-1] else None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def test_edsr_tail_after_a_channel_svd_loses_its_hr_conv(tmp_path):
    model = _edsr()
    x = torch.rand(1, 3, 12, 17, dtype=torch.float64)
    rules = [{"op_names": ["tail.0.0"], "method": "channel_svd", "rank": 16}]
    compressed, _ = convfactor.compress(model, rules, x, merge=False)
    assert isinstance(compressed.tail[0][0], Factorized) and _hr_convs(compressed, x) == ["tail.1"]
    merged, report = merge(compressed, x)
    (group,) = report.merged
    assert group.rule == "subpixel+1x1->kxk" and group.paths == ("tail.0.0.1", "tail.0.1", "tail.1")
    assert _hr_convs(merged, x) == [] and isinstance(merged.tail[0][1], BiasFieldConv2d)
    before, after = convfactor.count(compressed, x)["macs"], convfactor.count(merged, x)["macs"]
    assert after < before and before - after == report.macs_saved          # the closed form is what runs
    _check_same(compressed, merged, 3, sizes=[(12, 17), (9, 7)], batch=1)
    assert not isinstance(merged.tail[0][0], Factorized)      # its pieces are no longer its recipe's
    convfactor.save(merged, tmp_path / "m")                   # compress -> merge -> save -> load
    loaded = convfactor.load(tmp_path / "m", _edsr())
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_edsr_dense_tail_is_left_with_the_reason():
    """Without a 1x1 before the PixelShuffle, the sub-pixel rewrite only raises the MACs (r^2 times)."""
    model = _edsr()
    x = torch.rand(1, 3, 12, 17, dtype=torch.float64)
    merged, report = merge(model, x)
    assert not report.merged and report.skipped[0].paths == ("tail.0.0", "tail.0.1", "tail.1")
    assert "after the sub-pixel rewrite" in report.skipped[0].reason
    assert convfactor.count(merged, x)["macs"] == convfactor.count(model, x)["macs"]
    _check_same(model, merged, 3, sizes=[(12, 17), (9, 7)], batch=1)


# ---------------------------------------------------------------------------- compress, save / load
def test_compress_merges_by_default_and_merge_false_opts_out(tmp_path):
    model = _edsr()
    x = torch.rand(1, 3, 10, 13, dtype=torch.float64)
    rules = [{"op_names": ["tail.0.0"], "method": "channel_svd", "rank": 16}]
    merged, report = convfactor.compress(model, rules, x)
    assert report.merge.merged[0].rule == "subpixel+1x1->kxk" and "merging linear chains" in report.table()
    assert report.to_dict()["merge"]["macs_saved"] == report.merge.macs_saved > 0
    kept, kept_report = convfactor.compress(model, rules, x, merge=False)
    assert kept_report.merge is None and isinstance(kept.tail[0][0], Factorized)
    _check_same(kept, merged, 3, sizes=[(10, 13), (6, 5)], batch=1)
    assert type(model.tail[1]) is nn.Conv2d                              # the user's model is untouched
    convfactor.save(merged, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["merged"][0]["demoted"] == json.loads(json.dumps({"tail.0.0": kept.tail[0][0].recipe()}))
    loaded = convfactor.load(tmp_path / "m", _edsr())
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))
    convfactor.save(loaded, tmp_path / "again")                        # a loaded model keeps its record
    again = convfactor.load(tmp_path / "again", _edsr())
    with torch.no_grad():
        assert torch.equal(again(x), merged(x))


def test_save_load_a_merge_then_a_factorization_of_the_merged_conv(tmp_path):
    """Merged first, then compressed: load replays the merge before rebuilding the factorized layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    x = torch.randn(1, 3, 9, 11)
    merged, report = merge(model, x)
    assert isinstance(merged[1], BiasFieldConv2d)
    compressed, _ = convfactor.compress(merged, [{"op_names": ["1.conv"], "method": "channel_svd", "rank": 2}], x)
    assert isinstance(compressed[1].conv, Factorized)
    convfactor.save(compressed, tmp_path / "m")
    loaded = convfactor.load(tmp_path / "m", model)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
    _, again = merge(nn.Sequential(compressed[1], nn.Conv2d(8, 2, 1)), x)       # its conv is factorized now
    assert not again.merged and "no longer a plain Conv2d" in again.skipped[0].reason


def test_an_old_recipe_without_merges_still_loads(tmp_path):
    model = _edsr().float()
    x = torch.rand(1, 3, 8, 8)
    compressed, report = convfactor.compress(model, [{"op_names": ["body.0.*"], "method": "channel_svd", "rank": 8}], x)
    assert not report.merge.merged
    convfactor.save(compressed, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe.pop("merged") == []
    (tmp_path / "m" / "recipe.json").write_text(json.dumps(recipe))
    loaded = convfactor.load(tmp_path / "m", model)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))


def test_cli_no_merge(tmp_path, capsys):
    from convfactor.cli import main
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"op_names": ["tail.0.0"], "method": "channel_svd", "rank": 16}]))
    for flag, out in (([], "merged"), (["--no-merge"], "kept")):
        args = ["compress", "edsr_baseline_x2", "--rules", str(rules), "--input-size", "1x3x12x12",
                "-o", str(tmp_path / out)]
        assert main(args + flag) == 0
    printed = capsys.readouterr().out
    assert "subpixel+1x1->kxk" in printed
    assert json.loads((tmp_path / "merged" / "recipe.json").read_text())["merged"]
    kept = json.loads((tmp_path / "kept" / "recipe.json").read_text())
    assert kept["merged"] == [] and "tail.0.0" in kept["layers"]
