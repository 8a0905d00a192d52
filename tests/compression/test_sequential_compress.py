"""compress() with data-aware rules fits layers in execution order on what the compressed prefix gives
(issue 22, part 4); probe_layers and collect_input_pairs, the pieces it runs on."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import convfactor
from convfactor.rank import Target
from convfactor.compression.calibration import collect_input_pairs, collect_inputs, probe_layers
from strategies import rel_err


def _plain(depth=6, width=16, seed=0):
    """A deep plain ReLU network (SRMD's shape in miniature), float64."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(width, 3, 3, padding=1)]
    return nn.Sequential(*layers).double().eval()


def _images(n, seed, size=12):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, size // 3, size // 3, generator=g, dtype=torch.float64)
    return F.interpolate(smooth, size=(size, size), mode="bilinear") + 0.05 * torch.rand(
        n, 3, size, size, generator=g, dtype=torch.float64)


class _Mixed(nn.Module):
    """conv a -> ReLU module; conv b -> F.relu; conv c -> residual add, then ReLU; conv d -> ReLU and cat."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.a(x))
        x = F.relu(self.b(x))
        x = F.relu(self.c(x) + x)
        y = self.d(x)
        return torch.cat([torch.relu(y), y], 1)


def test_probe_finds_the_order_and_the_relu_fed_layers():
    model = _Mixed()
    order, relu_fed = probe_layers(model, ["d", "c", "b", "a"], torch.rand(1, 4, 6, 6))
    assert order == ["a", "b", "c", "d"]
    assert relu_fed == {"a", "b"}


def test_probe_sees_an_in_place_relu_and_not_past_it():
    model = _plain(depth=3)
    names = ["0", "2", "4"]
    order, relu_fed = probe_layers(model, names, _images(1, 0))
    assert order == names
    assert relu_fed == {"0", "2"}            # "4" writes the output


def test_pairs_are_the_two_models_inputs_on_the_same_samples():
    reference = _plain()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    batches = [_images(2, 1), _images(1, 2)]
    original, current = collect_input_pairs(reference, model, "4", batches)
    assert torch.equal(original, collect_inputs(reference, ["4"], batches)["4"])
    assert torch.equal(current, collect_inputs(model, ["4"], batches)["4"])
    assert not torch.allclose(original, current)


def test_pairs_are_cropped_alike_under_a_budget():
    reference = _plain()
    model = copy.deepcopy(reference)
    original, current = collect_input_pairs(reference, model, "2", [_images(4, 3, size=24)], max_bytes=8 * 16 * 8 * 8 * 8 * 2)
    assert original.shape == current.shape and original.shape[-1] < 24
    assert torch.equal(original, current)                 # nothing replaced yet: the same crops of the same inputs


def test_pairs_of_a_layer_the_forward_never_reaches_are_refused():
    model = nn.ModuleDict({"used": nn.Conv2d(3, 3, 1), "unused": nn.Conv2d(3, 3, 1)})
    model.forward = lambda x: model["used"](x)
    with pytest.raises(ValueError, match="no calibration input reached unused"):
        collect_input_pairs(model, copy.deepcopy(model), "unused", [torch.rand(1, 3, 4, 4)])


@pytest.mark.parametrize("method,rank", [("channel_svd", 5), ("tucker2", (4, 4))])
def test_sequential_fit_beats_the_independent_one(method, rank):
    model = _plain()
    calibration, held = [_images(8, 1, size=16)], _images(3, 7, size=16)
    rules = lambda **k: [{"op_names": ["2", "4", "6", "8"], "method": method, "rank": rank, "data_aware": True, **k}]
    seq, _ = convfactor.compress(model, rules(), calibration=calibration)
    ind, _ = convfactor.compress(model, rules(sequential=False), calibration=calibration)
    weights, _ = convfactor.compress(model, [{"op_names": ["2", "4", "6", "8"], "method": method, "rank": rank}])
    with torch.no_grad():
        for x in (calibration[0], held):
            want = model(x)
            e_seq, e_ind, e_w = (rel_err(m(x), want) for m in (seq, ind, weights))
            assert e_seq < e_w and e_ind < e_w
            if method == "channel_svd":              # the closed form: the upstream error is absorbed
                assert e_seq < e_ind


def test_auto_relu_fits_relu_fed_layers_as_relu_true_does():
    model = _plain(depth=4)
    calibration = [_images(2, 1, size=12)]
    rule = {"op_names": ["2"], "method": "channel_svd", "rank": 5, "data_aware": True}
    auto, _ = convfactor.compress(model, [rule], calibration=calibration)
    told, _ = convfactor.compress(model, [dict(rule, relu=True)], calibration=calibration)
    linear, _ = convfactor.compress(model, [dict(rule, relu=False)], calibration=calibration)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), told.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), linear.state_dict().values()))


def test_plan_apply_with_calibration_fits_to_the_data():
    model = _plain()
    x = _images(1, 0, size=16)
    p = convfactor.plan(model, x, target=Target("macs", 0.5), criterion="budget", exclude=["0", "10"])
    assert all("data_aware" not in r for r in p.rules()) and all(r["data_aware"] for r in p.rules(data_aware=True))
    calibration, held = [_images(4, 1, size=16)], _images(3, 7, size=16)
    fitted, _ = p.apply(model, x, calibration=calibration)
    plain, _ = p.apply(model, x)
    with torch.no_grad():
        assert rel_err(fitted(held), model(held)) < rel_err(plain(held), model(held))
