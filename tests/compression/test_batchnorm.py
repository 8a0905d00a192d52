"""BatchNorm folding: exact at full rank (float64) with non-trivial running statistics, pairs read from
the graph (not module order), conservative where unsure, never touching the caller's model."""
import copy
import json

import pytest
import torch
from torch import nn

import convfactor
from convfactor.compression.batchnorm import FoldedBatchNorm, bn_affine, fold_batchnorm, scale_outputs
from convfactor.methods.base import energy_rank
from convfactor.methods.linalg import grouped_matrix
from convfactor.rank import RankConfig, plan
from convfactor.spec.convspec import ConvSpec
from strategies import rel_err

FULL = {"method": "channel_svd", "energy": 1.0}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BN; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


class ConvBNReLU(nn.Module):
    """Conv-BN-ReLU twice (the second conv has a bias, the second BN no affine), then Linear-BN1d;
    modules are *declared* in an order unrelated to the data flow."""

    def __init__(self):
        super().__init__()
        self.bn_fc = nn.BatchNorm1d(5)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _net():
    torch.manual_seed(0)
    return randomize_bn(ConvBNReLU().double())


X = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("mode", [True, "keep", "remove"])
def test_full_rank_with_folding_is_exact_and_the_user_model_is_unchanged(mode):
    model = _net()
    before = _state(model)
    x = X.clone()
    compressed, report = convfactor.compress(model, FULL, x, fold_bn=mode)
    assert torch.equal(x, X) and _same_state(model, before)
    assert rel_err(compressed(X), model(X)) <= 1e-9
    assert any("folded 3 BatchNorm" in n for n in report.notes), report.notes
    if mode == "remove":
        assert all(isinstance(getattr(compressed, n), FoldedBatchNorm) for n in ("bn1", "bn2", "bn_fc"))
        assert compressed.conv1[-1].bias is not None          # the folded shift lives in the last piece
    else:                                                     # kept after the last factor, identity-initialised
        bn = compressed.bn1
        assert isinstance(bn, nn.BatchNorm2d) and torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)
        assert compressed.state_dict().keys() != model.state_dict().keys()        # factorized layers renamed
        assert {k for k in compressed.state_dict() if k.startswith("bn")} == {k for k in before if k.startswith("bn")}


def test_folding_changes_what_is_factorized_best_fit_of_the_folded_kernel():
    # At a low rank, compress fits s * W (the folded kernel) optimally (Eckart-Young), not W.
    model = _net()
    compressed, _ = convfactor.compress(model, {"op_names": ["conv2"], "method": "channel_svd", "rank": 3}, X)
    s, _ = bn_affine(model.bn2)
    spec = ConvSpec.from_module(model.conv2)
    folded = scale_outputs(model.conv2.weight, s, spec)
    m = convfactor.methods.registry.get("channel_svd")
    got = m.reconstruct(m.factors_of(compressed.conv2), spec)
    sv = torch.linalg.svdvals(grouped_matrix(folded, 1))
    assert torch.isclose((got - folded).pow(2).sum(), sv[:, 3:].pow(2).sum(), rtol=1e-8)
    # Without folding, W is fitted and the BN scales the fit afterwards: s * fit(W) is a worse fit of s * W.
    unfolded, _ = convfactor.compress(model, {"op_names": ["conv2"], "method": "channel_svd", "rank": 3}, X,
                                      fold_bn=False)
    rescaled = scale_outputs(m.reconstruct(m.factors_of(unfolded.conv2), spec), s, spec)
    assert (got - folded).norm() < 0.99 * (rescaled - folded).norm()


def test_a_conv_whose_output_is_also_used_elsewhere_is_not_folded():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Skip().double())
    compressed, report = convfactor.compress(model, FULL, X)
    assert torch.equal(compressed.bn.running_mean, model.bn.running_mean)
    assert any("also used elsewhere" in n for n in report.notes), report.notes
    assert rel_err(compressed(X), model(X)) <= 1e-9


def test_training_mode_batchnorm_is_not_folded():
    model = _net().train()
    before = _state(model)
    compressed, report = convfactor.compress(model, FULL, X)
    assert any("training mode" in n for n in report.notes), report.notes
    assert torch.equal(compressed.bn1.running_var, before["bn1.running_var"])
    assert isinstance(compressed.bn1, nn.BatchNorm2d) and compressed.bn1.training
    assert _same_state(model, before)                      # the capture passes ran in eval mode


def test_the_graph_decides_not_module_order_and_untraceable_models_use_hooks():
    class Crossed(nn.Module):
        """bn_a is declared right after conv_a but normalizes conv_b's output; data-dependent control
        flow makes symbolic tracing fail, so only the forward-hook analysis can pair them."""

        def __init__(self):
            super().__init__()
            self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(6)
            self.conv_b, self.bn_b = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_b(self.conv_a(x))
            if y.detach().sum().item() > -1e9:           # not symbolically traceable
                y = torch.relu(y)
            return self.bn_a(self.conv_b(y))

    model = randomize_bn(Crossed().double())
    work = copy.deepcopy(model)
    result = fold_batchnorm(work, X, mode="remove")
    assert {(r.layer, r.bn) for r in result.folded} == {("conv_a", "bn_b"), ("conv_b", "bn_a")}
    assert rel_err(work(X), model(X)) <= 1e-12
    untouched = copy.deepcopy(model)
    result = fold_batchnorm(untouched, None)             # no example input, no trace: nothing folded, said why
    assert not result.folded and "symbolic tracing failed" in result.problem
    assert _same_state(untouched, _state(model))


def test_linear_batchnorm_needs_an_example_input_and_a_2d_output():
    model = _net()
    work = copy.deepcopy(model)
    result = fold_batchnorm(work, None)
    by_bn = {r.bn: r for r in result.records}
    assert by_bn["bn1"].folded and by_bn["bn2"].folded and not by_bn["bn_fc"].folded
    assert "example input" in by_bn["bn_fc"].reason

    class Tokens(nn.Module):                              # Linear on (B, T, F): BN1d's channel axis is T
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    tokens = randomize_bn(Tokens().double())
    result = fold_batchnorm(copy.deepcopy(tokens), torch.randn(2, 4, 4, dtype=torch.float64))
    assert not result.folded and "3-D output" in result.records[0].reason


def test_only_selected_layers_are_folded_and_skipped_layers_stay_identical():
    model = _net()
    rules = [{"op_names": ["conv2"], "method": "channel_svd", "energy": 1.0},
             {"op_names": ["conv1"], "method": "tt", "rank": 2}]             # tt refuses a 3x3 conv: skipped
    compressed, report = convfactor.compress(model, rules, X)
    assert [L.name for L in report.compressed] == ["conv2"]
    assert torch.equal(compressed.conv1.weight, model.conv1.weight)
    assert torch.equal(compressed.bn1.running_mean, model.bn1.running_mean)
    assert not torch.equal(compressed.bn2.running_var, model.bn2.running_var)   # folded (kept, reset)
    assert rel_err(compressed(X), model(X)) <= 1e-9


@pytest.mark.parametrize("mode", ["keep", "remove"])
def test_save_load_round_trips_a_folded_model(mode, tmp_path):
    model = _net()
    compressed, _ = convfactor.compress(model, {"method": "channel_svd", "macs_ratio": 0.6}, X, fold_bn=mode)
    path = convfactor.save(compressed, tmp_path / "out")
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["folded_bn"] == ({"bn1": "conv1", "bn2": "conv2", "bn_fc": "fc"} if mode == "remove" else {})
    loaded = convfactor.load(path, model)
    assert torch.equal(loaded(X), compressed(X))


def test_bad_fold_mode_is_a_clean_error():
    with pytest.raises(ValueError, match="fold_bn must be"):
        convfactor.compress(_net(), FULL, X, fold_bn="yes")
    with pytest.raises(ValueError, match="fold_bn must be"):
        RankConfig(fold_bn="keep")


def test_plan_reads_the_folded_kernels():
    model = _net()
    p = plan(model, X, target="energy=0.9", criterion="energy", method="channel_svd")
    ranks = {L.name: L.ranks for L in p.compressed}
    s, _ = bn_affine(model.bn2)
    folded = scale_outputs(model.conv2.weight, s, ConvSpec.from_module(model.conv2))
    want = energy_rank(torch.linalg.svdvals(grouped_matrix(folded, 1)), 0.9)
    assert ranks["conv2"] == [want]
    unfolded = plan(model, X, target="energy=0.9", criterion="energy", method="channel_svd",
                    config=RankConfig(fold_bn=False))
    assert {L.name: L.ranks for L in unfolded.compressed}["conv2"] == \
        [energy_rank(torch.linalg.svdvals(grouped_matrix(model.conv2.weight.detach(), 1)), 0.9)]


def test_torchvision_resnet18_exact_at_full_rank_with_folding():
    thirdparty = pytest.importorskip("thirdparty")
    torchvision = thirdparty.load("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18().double())
    before = _state(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    # The stem, the first stage and every downsample branch (a conv-BN pair inside a Sequential):
    # the other layers are 512-wide and only cost time here.
    names = ["conv1", "layer1.*", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    compressed, report = convfactor.compress(model, {"op_names": names, **FULL}, x)
    assert len(report.compressed) == 8 and any("folded 8 BatchNorm" in n for n in report.notes), report.notes
    assert rel_err(compressed(x), model(x)) <= 1e-9
    assert _same_state(model, before)
    assert torch.equal(compressed.layer2[0].bn1.running_mean, model.layer2[0].bn1.running_mean)   # not selected
    result = fold_batchnorm(copy.deepcopy(model), x)            # every pair of the network is found
    assert len(result.folded) == 20
