"""RRDBNet, the ESRGAN generator (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution GANs", Fig. 4).

``num_blocks`` residual-in-residual dense blocks (23 in the paper), each three residual dense blocks of five
3x3 convs (growth ``grow`` = 32, LeakyReLU 0.2, residual scaling beta = 0.2), then a trunk conv, two
(nearest x2 upsample, conv, LeakyReLU) stages, and two convs to RGB.  ``rrdbnet_x2`` follows BasicSR:
a pixel-unshuffle by 2 in front of the same x4 network.  Images are in [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualDenseBlock(nn.Module):
    def __init__(self, feats: int = 64, grow: int = 32, beta: float = 0.2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(feats + i * grow, grow if i < 4 else feats, 3, padding=1)
                                   for i in range(5))
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs[:4]:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + self.beta * self.convs[4](torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, feats: int = 64, grow: int = 32, beta: float = 0.2):
        super().__init__()
        self.rdbs = nn.Sequential(*[ResidualDenseBlock(feats, grow, beta) for _ in range(3)])
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.beta * self.rdbs(x)


class RRDBNet(nn.Module):
    """Input (B, 3, h, w) in [0, 1] -> (B, 3, scale*h, scale*w); ``scale`` is 4, or 2 via pixel-unshuffle."""

    def __init__(self, scale: int = 4, num_blocks: int = 23, feats: int = 64, grow: int = 32, n_colors: int = 3):
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"RRDBNet supports scale 2 or 4, got {scale}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.scale = scale
        self.conv_first = nn.Conv2d(n_colors * (4 if scale == 2 else 1), feats, 3, padding=1)
        self.body = nn.Sequential(*[RRDB(feats, grow) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(feats, feats, 3, padding=1)
        self.conv_up1 = nn.Conv2d(feats, feats, 3, padding=1)
        self.conv_up2 = nn.Conv2d(feats, feats, 3, padding=1)
        self.conv_hr = nn.Conv2d(feats, feats, 3, padding=1)
        self.conv_last = nn.Conv2d(feats, n_colors, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 2:
            x = F.pixel_unshuffle(x, 2)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.act(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.act(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.act(self.conv_hr(feat)))


def rrdbnet_x4(num_blocks: int = 23, feats: int = 64, grow: int = 32) -> RRDBNet:
    return RRDBNet(4, num_blocks, feats, grow)


def rrdbnet_x2(num_blocks: int = 23, feats: int = 64, grow: int = 32) -> RRDBNet:
    return RRDBNet(2, num_blocks, feats, grow)
