"""The blog's small CIFAR network: six convs, the 1st and 3rd are 5x5.

A Network-in-Network style stack (Lin et al. 2014): 5x5 3->192, 1x1 192->96, maxpool, 5x5 96->192,
1x1 192->192, maxpool, 3x3 192->192, 1x1 192->classes, global average pool.  The widths are
reconstructed from the blog's own figures: Tai et al.'s spatial SVD at ranks 10 and 20 shrinks layers 1
and 3 by x1.48 and x16 (3*192*25 / (10*(3+192)*5) = 1.48; 96*192*25 / (20*(96+192)*5) = 16), which
these widths reproduce (``tests/models`` checks it).
"""
from __future__ import annotations

import torch
from torch import nn


class BlogNet(nn.Module):
    """Input (B, 3, 32, 32) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        r = nn.ReLU
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 192, 5, padding=2), r(inplace=True),
            nn.Conv2d(192, 96, 1), r(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(96, 192, 5, padding=2), r(inplace=True),
            nn.Conv2d(192, 192, 1), r(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(192, 192, 3, padding=1), r(inplace=True),
            nn.Conv2d(192, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


def blognet(num_classes: int = 10, in_channels: int = 3) -> BlogNet:
    return BlogNet(num_classes, in_channels)
