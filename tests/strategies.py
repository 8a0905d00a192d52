"""Shared hypothesis strategies and helpers: random conv layers with every option.

A property test of a method draws only layers that method takes (``method=`` below): the shapes come
from :func:`accepted_shapes`, so a refusal can never turn into a silent pass, and each method's
refusals are pinned by their own tests (tests/methods/)."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]

Shape = tuple[int, int, int, tuple[int, ...]]     # (groups, in_channels, out_channels, kernel_size)


def shape_grid(dim: int, groups, max_in: int, max_out: int, max_kernel: int, square: bool = False) -> tuple[Shape, ...]:
    """Every ``(groups, in_channels, out_channels, kernel_size)`` with ``1..max_in`` / ``1..max_out``
    channels per group and ``1..max_kernel`` taps per axis (all equal when ``square``), simplest first."""
    kernels = ([(k,) * dim for k in range(1, max_kernel + 1)] if square
               else list(itertools.product(range(1, max_kernel + 1), repeat=dim)))
    return tuple((g, g * ci, g * co, k) for g in groups for ci in range(1, max_in + 1)
                 for co in range(1, max_out + 1) for k in kernels)


def conv2d_grid(max_channels: int = 8, allow_groups: bool = True, square: bool = False) -> tuple[Shape, ...]:
    """The shapes :func:`conv2d_configs` draws."""
    return sum((shape_grid(2, (g,), max_channels // g, max_channels // g, 4, square)
                for g in ((1, 2) if allow_groups else (1,))), ())


def convnd_grid(dim: int) -> tuple[Shape, ...]:
    """The shapes :func:`convnd_configs` draws."""
    return shape_grid(dim, (1, 2), 3, 4, 3)


def shape_spec(shape: Shape, transposed: bool = False):
    """The :class:`ConvSpec` of a conv of ``shape`` (built on the meta device: no weights)."""
    from convfactor.spec.convspec import ConvSpec, conv_class
    groups, cin, cout, kernel = shape
    return ConvSpec.from_module(conv_class(len(kernel), transposed)(cin, cout, kernel, groups=groups, device="meta"))


def refusal(method, shape: Shape, transposed: bool = False) -> str | None:
    """Why ``method`` (a registry name or a configured method) refuses a conv of ``shape``: its
    UnsupportedLayer message, or None when it takes it."""
    from convfactor.methods import registry
    from convfactor.spec.convspec import UnsupportedLayer
    try:
        (registry.get(method) if isinstance(method, str) else method).check(shape_spec(shape, transposed))
    except UnsupportedLayer as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def accepted_shapes(method, grid: tuple[Shape, ...], transposed: bool = False) -> tuple[Shape, ...]:
    """The shapes of ``grid`` that ``method`` takes, in the grid's order (an error if it takes none)."""
    kept = tuple(shape for shape in grid if refusal(method, shape, transposed) is None)
    if not kept:
        raise ValueError(f"{method} refuses every shape of the grid")
    return kept


@st.composite
def conv2d_configs(draw, max_channels: int = 8, allow_groups: bool = True, square: bool = False,
                   method: str | None = None):
    """Conv2d layers with every option; with ``method``, only the shapes it takes."""
    if method is None:
        groups = draw(st.sampled_from([1, 2])) if allow_groups else 1
        cin = groups * draw(st.integers(1, max_channels // groups))
        cout = groups * draw(st.integers(1, max_channels // groups))
        kh = draw(st.integers(1, 4))
        kw = kh if square else draw(st.integers(1, 4))
    else:
        groups, cin, cout, (kh, kw) = draw(st.sampled_from(
            accepted_shapes(method, conv2d_grid(max_channels, allow_groups, square))))
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
def convnd_configs(draw, dim, method: str | None = None):
    """Conv1d / Conv3d layers with every option (small, for speed); with ``method``, only the shapes it takes."""
    if method is None:
        groups = draw(st.sampled_from([1, 2]))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 4))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    else:
        groups, cin, cout, kernel = draw(st.sampled_from(accepted_shapes(method, convnd_grid(dim))))
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


def full_rank_replacement(layer: nn.Module, name: str) -> nn.Module:
    """Method ``name``'s replacement of ``layer`` at its full ranks.  A refusal raises (UnsupportedLayer):
    property tests draw only layers the method takes, so a refusal there is a failure, never a pass."""
    from convfactor import factorize
    from convfactor.methods import registry
    from convfactor.spec.convspec import ConvSpec
    return factorize(layer, name, rank=registry.get(name).full_rank(ConvSpec.from_module(layer)))


def check_exact(layer: nn.Module, name: str, x: torch.Tensor, tol: float) -> None:
    """Method ``name`` at full rank reproduces ``layer`` on ``x`` within relative error ``tol``."""
    new = full_rank_replacement(layer, name)
    with torch.no_grad():
        err = rel_err(new(x), layer(x))
    assert err <= tol, f"{name} at full rank: relative error {err:.3g} > {tol:g} on {layer}"


def check_bad_options(cases) -> None:
    """Each ``(method, options, words)`` of ``cases``: configuring the method raises a ValueError matching ``words``."""
    from convfactor.methods import registry
    for name, options, words in cases:
        with pytest.raises(ValueError, match=words):
            registry.get(name, **options)
