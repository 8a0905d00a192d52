"""The data-aware candidate error (issue 15): a layer's relative output error on the example's data,
computed from its input Gram, agrees with running the layers; the planner records and uses it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convfactor
from convfactor import models
from convfactor.rank import LatencyConfig, RankConfig, plan
from convfactor.rank.facts import input_gram, output_error
from convfactor.spec.convspec import ConvSpec

from fake_timer import FakeTimer


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2), (2, 8, 9, 11)),
    (nn.Conv2d(6, 6, (3, 1), padding=(2, 0), dilation=2, padding_mode="reflect"), (1, 6, 10, 7)),
    (nn.Linear(10, 7), (3, 5, 10))], ids=["grouped-strided", "reflect-dilated", "linear"])
def test_output_error_from_the_gram_equals_running_the_layers(layer, shape):
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(*shape, dtype=torch.float64) * torch.linspace(0.1, 3, shape[-1], dtype=torch.float64)
    spec = ConvSpec.from_module(layer)
    approx = layer.weight.detach() + 0.05 * torch.randn_like(layer.weight)
    if isinstance(layer, nn.Linear):
        want = (F.linear(x, approx) - F.linear(x, layer.weight)).norm() / F.linear(x, layer.weight).norm()
    else:
        other = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                          padding_mode=layer.padding_mode).double()
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                          padding_mode=layer.padding_mode).double()
        with torch.no_grad():
            other.weight.copy_(approx)
            plain.weight.copy_(layer.weight)
        want = (other(x) - plain(x)).norm() / plain(x).norm()
    got = output_error(approx, layer.weight.detach(), input_gram(x, spec))
    assert got == pytest.approx(float(want), rel=1e-9)


def test_the_planner_uses_output_errors_on_the_example(tmp_path):
    torch.manual_seed(0)
    model, x = models.get("resnet20"), models.default_input("resnet20")
    cfg = LatencyConfig(timer=FakeTimer(), repeats=1, e2e_rounds=1, e2e_repeats=1)
    # fold_bn=False: errors of the convs themselves (with BN folded they are of conv + BN, as compressed)
    on_data = plan(model, x, target="speedup=1.5x", latency=cfg, config=RankConfig(error="output", fold_bn=False),
                   methods=("channel_svd",))
    on_kernel = plan(model, x, target="speedup=1.5x", latency=cfg, methods=("channel_svd",))
    assert on_data.summary["error_metric"] == "output" and on_kernel.summary["error_metric"] == "kernel"
    layers = dict(model.named_modules())
    inputs = {}
    def keep(name):
        def hook(module, args, output):          # returns None: the module's output is left as it is
            inputs.setdefault(name, args[0].clone())
        return hook
    hooks = [layers[p.name].register_forward_hook(keep(p.name)) for p in on_data.compressed]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for p in on_data.compressed[:3]:
        layer = layers[p.name]
        new = convfactor.factorize(layer, "channel_svd", rank=p.ranks[0])
        with torch.no_grad():
            bias = layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0
            want = (new(inputs[p.name]) - layer(inputs[p.name])).norm() / (layer(inputs[p.name]) - bias).norm()
        assert p.error == pytest.approx(float(want), rel=1e-4), (p.name, p.ranks)
    with pytest.raises(ValueError, match="error must be"):
        RankConfig(error="weights")


@pytest.mark.parametrize("groups", [1, 2])
def test_response_error_is_what_the_data_aware_fit_reaches(groups):
    """error="response": a channel-SVD candidate's error is the data-aware fit's relative output error
    on the example (the discarded share of the response spectrum), which factorizing it confirms."""
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, padding=1, groups=groups, bias=False).double()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)[:, None, None]
    from convfactor.rank.facts import collect
    from convfactor.methods import registry
    method = registry.get("channel_svd")
    (facts,), _ = collect(nn.Sequential(layer), x, [method], on_data=True, response=True)
    fitted = convfactor.factorize(layer, "channel_svd", rank=3, calibration=x, holdout=0.0, ridge=0.0)
    with torch.no_grad():
        want = (fitted(x) - layer(x)).norm() / layer(x).norm()
    assert facts.kernel_error(method, (3,)) == pytest.approx(float(want), rel=1e-6)
    (weights_only,), _ = collect(nn.Sequential(layer), x, [method], on_data=True)
    assert weights_only.kernel_error(method, (3,)) > facts.kernel_error(method, (3,))
