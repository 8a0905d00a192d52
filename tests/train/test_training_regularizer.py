"""Fine-tuning adds the loss terms the model's factorized layers declare
(:meth:`Factorized.training_regularizer`), weighted by ``basis_weight``: no isinstance on a method's
module in the training loop."""
import pytest
import torch
from torch import nn

from convfactor.compression.api import compress
from convfactor.methods.base import Factorized, model_regularizer, regularized_layers
from convfactor.methods.basis import BasisConv2d, basis_regularizer
from convfactor.spec.convspec import ConvSpec
from convfactor.train.finetune import DistillConfig, FinetuneConfig, OptimizerConfig, finetune


class Shrinking(Factorized):
    """A made-up factorized layer whose regularizer is its squared weight (and records its reference)."""
    has_training_regularizer = True

    def training_regularizer(self, reference=None):
        self.seen = reference
        return self[0].weight.pow(2).sum()


def _shrinking_model() -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    return nn.Sequential(Shrinking(conv, method="made_up", spec=ConvSpec.from_module(conv), ranks=(4,)))


def _config(steps=3, **kw) -> FinetuneConfig:
    return FinetuneConfig(steps=steps, batch_size=2, optimizer=OptimizerConfig(lr=1e-2), progress=False, **kw)


def test_any_factorized_layer_with_a_regularizer_is_trained_by_it():
    model = _shrinking_model()
    start = float(model[0][0].weight.detach().pow(2).sum())
    history = []
    # inputs alone, no teacher: the regularizer is the whole loss, times basis_weight
    finetune(model, torch.randn(8, 4, 5, 5), _config(basis_weight=2.0), history=history)
    assert history[0]["loss"] == pytest.approx(2 * start)
    assert float(model[0][0].weight.detach().pow(2).sum()) < start and model[0].seen is None
    with pytest.raises(ValueError, match="nothing to optimize"):                 # basis_weight=0: off
        finetune(_shrinking_model(), torch.randn(8, 4, 5, 5), _config(basis_weight=0.0))


def test_the_teacher_layer_of_the_same_name_is_the_reference():
    model, teacher = _shrinking_model(), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    finetune(model, torch.randn(8, 4, 5, 5), _config(steps=1, distill=DistillConfig(weight=0.0)), teacher=teacher)
    assert model[0].seen is teacher[0].weight


def test_layers_without_a_regularizer_add_nothing():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    compressed, _ = compress(net, [{"method": "channel_svd", "rank": 2}], torch.randn(1, 4, 5, 5))
    assert isinstance(compressed[0], Factorized) and regularized_layers(compressed) == []
    assert model_regularizer(compressed) is None
    with pytest.raises(ValueError, match="nothing to optimize"):
        finetune(compressed, torch.randn(8, 4, 5, 5), _config(basis_weight=1.0))


def test_the_basis_hook_is_eq12_and_basis_regularizer_its_sum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 3, 1))
    compressed, _ = compress(net, [{"op_names": ["0", "2"], "method": "basis", "rank": 3},
                                   {"op_names": ["4"], "method": "channel_svd", "rank": 2}], torch.randn(1, 8, 6, 6))
    with torch.no_grad():
        for p in compressed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert [n for n, _ in regularized_layers(compressed)] == ["0", "2"]
    assert all(isinstance(m, BasisConv2d) for _, m in regularized_layers(compressed))
    terms = [compressed[i].training_regularizer(net[i].weight) for i in (0, 2)]
    assert torch.equal(basis_regularizer(compressed, net, gamma=0.5), 0.5 * (terms[0] + terms[1]))
    assert torch.equal(model_regularizer(compressed, net, gamma=0.5), basis_regularizer(compressed, net, gamma=0.5))
    assert torch.equal(model_regularizer(compressed), basis_regularizer(compressed))       # the kept references
    compressed[0].reference_weight = None
    with pytest.raises(ValueError, match="basis_regularizer: layer '0': no reference weight"):
        basis_regularizer(compressed)
