"""DnCNN (Zhang et al. 2017, "Beyond a Gaussian Denoiser", sec. III-A, Fig. 1).

``depth`` = 17 conv layers of 64 3x3 filters: conv+ReLU, then (depth-2) x (conv+BN+ReLU), then a conv back to
``channels``.  Residual learning: the network predicts the noise and the output is ``x - net(x)``.  The convs
followed by BatchNorm carry no bias (BN's shift replaces it).  Images are in [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    """Input (B, channels, H, W) noisy -> (B, channels, H, W) denoised."""

    def __init__(self, channels: int = 1, depth: int = 17, feats: int = 64):
        super().__init__()
        if depth < 3:
            raise ValueError(f"depth must be >= 3, got {depth}")
        layers = [nn.Conv2d(channels, feats, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(feats, feats, 3, padding=1, bias=False), nn.BatchNorm2d(feats), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(feats, channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def dncnn(depth: int = 17) -> DnCNN:
    """DnCNN-S for grey images (1 channel)."""
    return DnCNN(1, depth)


def dncnn_color(depth: int = 20) -> DnCNN:
    """CDnCNN, the colour variant (3 channels, depth 20 as in the paper's CDnCNN-B)."""
    return DnCNN(3, depth)
