"""image_facing (issue 22): the convs that read the input or write the output through no other conv or Linear,
found by following every torch call, whatever their channel counts."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from convfactor import models
from convfactor.compression.calibration import image_facing
from convfactor.recipes.pipeline import image_layers


@pytest.mark.parametrize("name,want", [
    ("srmd_x2", {"body.0", "body.22"}),            # 18 channels in (RGB + degradation maps), 12 sub-pixels out
    ("edsr_baseline_x2", {"head", "tail.1"}), ("dncnn", {"body.0", "body.47"}),
    ("rrdbnet_x4", {"conv_first", "conv_last"}),
    ("resnet20", {"conv1"})])                      # its last convs reach the logits only through the Linear
def test_zoo_models(name, want):
    assert image_facing(models.get(name).eval(), models.default_input(name)) == want


class _Paths(nn.Module):
    """a reads the input after a pooling; b after a; c is added to the input and written; d feeds a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.d, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = self.b(F.relu(self.a(F.avg_pool2d(x, 1))))
        image = x + self.c(y)
        return image, self.fc(self.d(y).mean((2, 3)))


def test_paths_through_other_ops_count_and_layers_stop_them():
    model = _Paths()
    assert image_facing(model, torch.rand(1, 3, 8, 8)) == {"a", "c"}
    assert image_facing(model, torch.rand(1, 3, 8, 8), names=["c", "d"]) == {"c"}
    # image_layers adds the channel rule (b writes 3 channels) to the graph's
    assert image_layers(model, torch.rand(1, 3, 8, 8)) == ["a", "b", "c", "d"] and image_layers(model) == ["a", "b", "c", "d"]
