"""Training the factorized structure from scratch (Tai et al. 2016), optionally with BatchNorm between factors."""
import pytest
import torch
from torch import nn

from convfactor.methods import registry
from convfactor.train.finetune import FinetuneConfig, OptimizerConfig, finetune
from convfactor.train.scratch import insert_batchnorm, lowrank_structure


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


METHOD = "spatial_svd" if "spatial_svd" in registry.available() else "channel_svd"


@pytest.mark.parametrize("batchnorm", [True, False])
def test_structure_is_fresh_factorized_and_trainable(batchnorm):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rules = [{"op_types": ["Conv2d"], "op_names": ["3"], "method": METHOD, "rank": 4}]
    model = lowrank_structure(net, rules, x, batchnorm=batchnorm, seed=7)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())      # original untouched
    block = model[3]
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 2 and min(c.out_channels for c in convs) == 4
    assert len(bns) == (len(convs) - 1 if batchnorm else 0)
    if batchnorm:   # BN sits right after the first factor and normalizes its rank channels
        assert list(block.children())[1].num_features == convs[0].out_channels
    # fresh initialization: the unselected first conv is re-drawn, not the trained one
    assert not torch.equal(model[0].weight, net[0].weight)
    assert model(x).shape == net(x).shape
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    history = []
    finetune(model, data, FinetuneConfig(steps=40, batch_size=16, optimizer=OptimizerConfig(lr=1e-2), loss="ce",
                                         progress=False), history=history)
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])


def test_insert_batchnorm_places_bn_after_each_factor():
    seq = nn.Sequential(nn.Conv2d(4, 2, 1, bias=False), nn.Conv2d(2, 4, 3, padding=1))
    with_bn = insert_batchnorm(seq, last=True).eval()
    assert [type(m) for m in with_bn] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]
    x = torch.randn(1, 4, 5, 5)
    s = (1 + 1e-5) ** 0.5           # a fresh eval-mode BN computes y / sqrt(1 + eps)
    torch.testing.assert_close(with_bn(x), seq[1](seq[0](x) / s) / s)
