"""EDSR (Lim et al. 2017, "Enhanced Deep Residual Networks for Single Image Super-Resolution").

Images are in [0, 1]; the DIV2K RGB mean is subtracted at the head and added back at the tail
(a fixed, parameter-free shift, so it is never a factorization candidate).
"""
from __future__ import annotations

import math

import torch
from torch import nn

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


class MeanShift(nn.Module):
    def __init__(self, sign: float, mean=DIV2K_MEAN):
        super().__init__()
        self.register_buffer("shift", sign * torch.tensor(mean).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, feats: int, kernel: int = 3, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                                  nn.Conv2d(feats, feats, kernel, padding=kernel // 2))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + (out * self.res_scale if self.res_scale != 1 else out)


class Upsampler(nn.Sequential):
    def __init__(self, scale: int, feats: int):
        layers = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(feats, 4 * feats, 3, padding=1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(feats, 9 * feats, 3, padding=1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"scale {scale} is not supported")
        super().__init__(*layers)


class EDSR(nn.Module):
    """``n_resblocks`` x ``n_feats``; input (B, 3, h, w) in [0, 1] -> (B, 3, scale*h, scale*w)."""

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, scale: int = 2, res_scale: float = 1.0,
                 n_colors: int = 3):
        super().__init__()
        self.scale = scale
        self.sub_mean = MeanShift(-1.0)
        self.add_mean = MeanShift(+1.0)
        self.head = nn.Conv2d(n_colors, n_feats, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(n_feats, 3, res_scale) for _ in range(n_resblocks)],
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), nn.Conv2d(n_feats, n_colors, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.tail(x))


def edsr_baseline_x2() -> EDSR:
    """EDSR baseline x2: 16 blocks x 64 feats (1.37 M params, EDSR-PyTorch model table)."""
    return EDSR(16, 64, 2, 1.0)


def edsr_baseline_x4() -> EDSR:
    """EDSR baseline x4: 16 blocks x 64 feats (1.5 M params, Lim et al. Table 1)."""
    return EDSR(16, 64, 4, 1.0)


def edsr_8_128_x2() -> EDSR:
    """EDSR-8-128 x2: 8 blocks x 128 feats, the variant compressed by Li et al. (ICCV 2019)."""
    return EDSR(8, 128, 2, 1.0)


def edsr_x2() -> EDSR:
    """The full EDSR x2: 32 blocks x 256 feats with residual scaling 0.1 (Lim et al. sec. 3.3; 40.7 M params)."""
    return EDSR(32, 256, 2, 0.1)


@torch.no_grad()
def bilinear_init(model: "EDSR") -> None:
    """Make an x2 EDSR compute bilinear x2 upsampling before training, in place.

    The head copies RGB into features 0-2; the second conv of every residual block and the body's
    last conv are scaled by 0.1 so the trunk starts near identity (the "zero-init residual" idea of
    Goyal et al. 2017); the upsampler's first 12 outputs hold bilinear x2 sub-pixel kernels of
    features 0-2, and the tail copies them back.  Training then only learns the correction.  The
    architecture is unchanged.
    """
    if model.scale != 2:
        raise ValueError(f"bilinear_init is for x2 EDSRs, got scale {model.scale}")
    if model.head.out_channels < 3:
        raise ValueError(f"bilinear_init needs at least 3 features, got {model.head.out_channels}")
    model.head.weight[:3].zero_()
    model.head.bias[:3].zero_()
    for c in range(3):
        model.head.weight[c, c, 1, 1] = 1.0
    for block in list(model.body)[:-1]:
        block.body[2].weight.mul_(0.1)
        block.body[2].bias.zero_()
    model.body[-1].weight.mul_(0.1)
    model.body[-1].bias.zero_()
    up = model.tail[0][0]               # Conv2d(feats, 4 * feats) followed by PixelShuffle(2)
    # bilinear x2 (half-pixel centres): sub-pixel 0 takes 0.25 * x[i-1] + 0.75 * x[i], sub-pixel 1 0.75 / 0.25
    taps = {0: torch.tensor([0.25, 0.75, 0.0]), 1: torch.tensor([0.0, 0.75, 0.25])}
    for c in range(3):
        for i in range(2):
            for j in range(2):
                out = c * 4 + i * 2 + j            # PixelShuffle: channel c*r^2 + i*r + j -> (c, i, j)
                up.weight[out].zero_()
                up.weight[out, c] = torch.outer(taps[i], taps[j])
                up.bias[out] = 0.0
    tail = model.tail[1]
    tail.weight.zero_()
    tail.bias.zero_()
    for c in range(3):
        tail.weight[c, c, 1, 1] = 1.0
