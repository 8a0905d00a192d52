"""The benchmarks' small training loop leaves BatchNorm statistics that belong to its final weights."""
import torch
from torch import nn

from benchmarks.experiments import train_epochs


def test_batchnorm_statistics_are_those_of_the_final_weights_on_the_training_set():
    torch.manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8) * 2 + 1, torch.randint(0, 4, (96,))
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4))
    train_epochs(model, (x, y), epochs=3, lr=1e-2, batch=16)
    assert not model.training
    with torch.no_grad():
        features = model[0](x)                                  # (96, 6, 8, 8) with the final weights
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, features.var((0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-5)
    assert bn.momentum == 0.1                                   # the module's own setting is restored
