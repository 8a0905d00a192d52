"""DenseNet for CIFAR (Huang et al. 2017, "Densely Connected Convolutional Networks", sec. 3-4).

Three dense blocks on 32/16/8 pixels.  Plain DenseNet: ``(depth-4)/3`` layers BN-ReLU-conv3x3(k) per block,
a 16-channel stem, transitions BN-ReLU-conv1x1-avgpool2.  DenseNet-BC: ``(depth-4)/6`` bottleneck layers
BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), a 2k stem and transitions halving the channels (theta = 0.5).
Head: BN-ReLU-global average pool-FC.  Table 2 of the paper: DenseNet (L=40, k=12) 1.0 M params,
DenseNet-BC (L=100, k=12) 0.8 M.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _DenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int, bottleneck: bool):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        if bottleneck:
            layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.Conv2d(ch, 4 * growth, 1, bias=False)]
            ch = 4 * growth
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.Conv2d(ch, growth, 3, padding=1, bias=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class _Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNetCifar(nn.Module):
    """Input (B, 3, 32, 32) -> logits (B, num_classes)."""

    def __init__(self, depth: int = 40, growth: int = 12, bc: bool = True, compression: float = 0.5,
                 num_classes: int = 10):
        super().__init__()
        per_block, rem = divmod(depth - 4, 6 if bc else 3)
        if rem or per_block < 1:
            raise ValueError(f"depth must be {'6' if bc else '3'}n+4, got {depth}")
        theta = compression if bc else 1.0
        ch = 2 * growth if bc else 16
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(per_block):
                layers.append(_DenseLayer(ch, growth, bc))
                ch += growth
            if block < 2:
                out = int(ch * theta)
                layers.append(_Transition(ch, out))
                ch = out
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet_bc_40_12(num_classes: int = 10) -> DenseNetCifar:
    return DenseNetCifar(40, 12, True, 0.5, num_classes)


def densenet_40_12(num_classes: int = 10) -> DenseNetCifar:
    """Plain DenseNet (L=40, k=12), 1.0 M params in the paper's Table 2."""
    return DenseNetCifar(40, 12, False, 1.0, num_classes)
