"""Shared hypothesis strategies and helpers: random conv layers with every option."""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv2d_configs(draw, max_channels: int = 8, allow_groups: bool = True, square: bool = False):
    groups = draw(st.sampled_from([1, 2])) if allow_groups else 1
    cin = groups * draw(st.integers(1, max_channels // groups))
    cout = groups * draw(st.integers(1, max_channels // groups))
    kh = draw(st.integers(1, 4))
    kw = kh if square else draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(PADDING_MODES))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding == "same":
        stride = (1, 1)
        pad = "same"
    elif padding == "valid":
        pad = "valid"
    elif padding == "int":
        pad = draw(st.integers(0, 2))
    else:
        pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bias = draw(st.booleans())
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=pad,
                dilation=dilation, groups=groups, bias=bias, padding_mode=mode)


def make_layer(cfg: dict, dtype=torch.float64, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(**cfg, dtype=dtype)


def input_for(layer: nn.Module, size=(11, 9), batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    """An input big enough for reflect padding and the dilated kernel."""
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, layer.in_features, generator=g, dtype=dtype)
    dims = len(layer.kernel_size)
    size = tuple(size[:dims]) if dims <= len(size) else (size + (7,) * dims)[:dims]
    return torch.randn(batch, layer.in_channels, *size, generator=g, dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@st.composite
def convnd_configs(draw, dim):
    """Conv1d / Conv3d layers with every option (small, for speed)."""
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding == "same":
        stride = 1
    elif padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    return dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=draw(st.booleans()),
                padding_mode=draw(st.sampled_from(PADDING_MODES)))


def input_nd(layer, dim):
    """A float64 input for a Conv1d/2d/3d ``layer``."""
    size = {1: (13,), 2: (9, 8), 3: (7, 6, 7)}[dim]
    return torch.randn(2, layer.in_channels, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def make_nd(cfg: dict, dim: int, seed: int = 0) -> nn.Module:
    """A float64 ``nn.Conv{dim}d`` from a :func:`convnd_configs` config."""
    from convfactor.spec.convspec import conv_class
    torch.manual_seed(seed)
    return conv_class(dim)(**cfg, dtype=torch.float64)


def full_rank_or_none(layer: nn.Module, name: str):
    """The full ranks of method ``name`` on ``layer``, or None when the method refuses the layer."""
    from convfactor.methods import registry
    from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
    method = registry.get(name)
    spec = ConvSpec.from_module(layer)
    try:
        method.check(spec)
    except UnsupportedLayer:
        return None
    return method.full_rank(spec)
