"""Calibration inputs collected with hooks under a memory budget (issue 7, item 2)."""
import pytest
import torch
from torch import nn

from convfactor.compression.calibration import collect_inputs


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(y.movedim(1, -1))          # Linear on (B, H, W, C): leading axes are flattened


def _reference(model, names, batches):
    got = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return got


def test_exact_inputs_within_budget_and_model_untouched():
    model = _Net().train()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    out = collect_inputs(model, ["conv2", "fc"], batches, max_bytes=10 ** 8)
    ref = _reference(model.eval(), ["conv2", "fc"], batches)
    assert torch.equal(out["conv2"], torch.cat(ref["conv2"]))
    assert torch.equal(out["fc"], torch.cat([r.reshape(-1, 5) for r in ref["fc"]]))
    model.train()
    collect_inputs(model, ["conv1"], batches[0])       # a single tensor is one batch
    assert model.training
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_budget_crops_real_windows_and_is_deterministic():
    model = _Net()
    # values encode (sample, channel, row, col), so a crop can be located in its source
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32)
    budget = 3 * 16 * 16 * 4 * 8 + 100         # room for 8 crops of about 16x16
    out = collect_inputs(model, ["conv1"], [x, x + x.numel()], max_bytes=budget)["conv1"]
    assert out.numel() * out.element_size() <= budget
    assert out.shape[2] < 32 and out.shape[0] >= 1
    flat = torch.cat([x, x + x.numel()])
    for crop in out:
        start = int(crop[0, 0, 0].item())
        b, rem = divmod(start, 3 * 32 * 32)
        c, rem = divmod(rem, 32 * 32)
        h, w = divmod(rem, 32)
        assert c == 0
        hc, wc = crop.shape[1:]
        assert torch.equal(crop, flat[b, :, h:h + hc, w:w + wc])
    again = collect_inputs(model, ["conv1"], [x, x + x.numel()], max_bytes=budget)["conv1"]
    assert torch.equal(out, again)


def test_linear_rows_are_reservoir_sampled_under_budget():
    model = _Net()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    out = collect_inputs(model, ["fc"], batches, max_bytes=5 * 4 * 50)["fc"]
    assert out.shape == (50, 5)
    ref = torch.cat([r.reshape(-1, 5) for r in _reference(model.eval(), ["fc"], batches)["fc"]])
    # every kept row is a real row, and they come from all over the stream (not just the first 50)
    idx = [int(((ref - row).abs().sum(1) == 0).nonzero()[0]) for row in out]
    assert max(idx) >= 50


def test_bad_arguments():
    model = _Net()
    with pytest.raises(ValueError, match="max_bytes"):
        collect_inputs(model, ["conv1"], torch.randn(1, 3, 8, 8), max_bytes=0)
    with pytest.raises(AttributeError):
        collect_inputs(model, ["nope"], torch.randn(1, 3, 8, 8))
