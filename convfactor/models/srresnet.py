"""SRResNet (Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a GAN", Fig. 4).

The generator of SRGAN trained with the MSE loss: a 9x9 head conv + PReLU, ``n_blocks`` residual blocks
(conv3-BN-PReLU-conv3-BN + identity), a conv3-BN closing the long skip, one (conv3 64->256, PixelShuffle x2,
PReLU) stage per factor 2 of the scale, and a 9x9 conv to RGB.  Images are in [0, 1] on both ends (the
paper's [-1, 1] output scaling is dropped so every zoo SR model shares one convention).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class _ResBlock(nn.Module):
    def __init__(self, feats: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.BatchNorm2d(feats), nn.PReLU(),
                                  nn.Conv2d(feats, feats, 3, padding=1), nn.BatchNorm2d(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """Input (B, 3, h, w) in [0, 1] -> (B, 3, scale*h, scale*w)."""

    def __init__(self, scale: int = 4, n_blocks: int = 16, feats: int = 64, n_colors: int = 3):
        super().__init__()
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"SRResNet supports scales 2, 4, 8, ...; got {scale}")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(n_colors, feats, 9, padding=4), nn.PReLU())
        self.body = nn.Sequential(*[_ResBlock(feats) for _ in range(n_blocks)],
                                  nn.Conv2d(feats, feats, 3, padding=1), nn.BatchNorm2d(feats))
        up = []
        for _ in range(int(math.log2(scale))):
            up += [nn.Conv2d(feats, 4 * feats, 3, padding=1), nn.PixelShuffle(2), nn.PReLU()]
        self.tail = nn.Sequential(*up, nn.Conv2d(feats, n_colors, 9, padding=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return self.tail(x + self.body(x))


def srresnet_x4(n_blocks: int = 16) -> SRResNet:
    return SRResNet(4, n_blocks)


def srresnet_x2(n_blocks: int = 16) -> SRResNet:
    return SRResNet(2, n_blocks)
