"""Conv options, handled once for every method.

A :class:`ConvSpec` is a plain description of a ``nn.Conv1d/2d/3d`` (or ``nn.Linear``): channel
counts, kernel size and, *per spatial axis*, stride, dilation and the two sides of padding
(``'same'`` and ``'valid'`` resolved to numbers), plus ``padding_mode``, ``groups``, bias,
dtype and device.

Every factorization is a chain of convolutions, each of which carries a *subset* of the
spatial axes (all of them for a kxk core, one for Tai et al.'s kx1 / 1xk pair, none for a 1x1).
:func:`make_conv` builds such a piece: the axes it carries get the original's stride, dilation
and padding on that axis, the others get 1 / 1 / 0.  This is exact because

* zero, reflect, replicate and circular padding are separable per axis (padding H then W gives
  the same tensor as padding both at once), and
* they commute with point-wise channel mixing (1x1 convs), which only acts on channels.

Asymmetric padding (``padding='same'`` with an even kernel) cannot be expressed by a conv's
``padding`` argument; :func:`make_conv` then prepends a :class:`Pad` module on that axis.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ConvSpec", "Pad", "make_conv", "conv_class", "UnsupportedLayer", "is_conv"]

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class UnsupportedLayer(ValueError):
    """Raised when a layer (or one of its options) cannot be factorized by a method."""


def conv_class(dim: int) -> type[nn.Module]:
    return _CONV_TYPES[dim]


def is_conv(layer: nn.Module) -> bool:
    """True for plain (not transposed) ``nn.Conv1d/2d/3d`` and their subclasses."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not getattr(layer, "transposed", False)


def _tuple(value, dim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"expected {dim} values, got {value}")
    return value


@dataclass(frozen=True)
class ConvSpec:
    """Everything about a conv layer that a factorization must preserve.

    ``weight`` of the layer: ``(out_channels, in_channels // groups, *kernel_size)``.
    A ``nn.Linear(in, out)`` is described as a 1x1 ``Conv2d`` with ``dim=0`` (no spatial axes).
    """

    dim: int                                   # number of spatial axes (0 for Linear)
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]       # (before, after) per spatial axis
    padding_mode: str = "zeros"
    groups: int = 1
    bias: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, layer: nn.Module) -> "ConvSpec":
        if isinstance(layer, nn.Linear):
            return cls(dim=0, in_channels=layer.in_features, out_channels=layer.out_features,
                       kernel_size=(), stride=(), dilation=(), padding=(), bias=layer.bias is not None)
        if not is_conv(layer):
            raise UnsupportedLayer(f"{type(layer).__name__} is not a Conv1d/2d/3d or Linear")
        dim = len(layer.kernel_size)
        kernel = _tuple(layer.kernel_size, dim)
        dilation = _tuple(layer.dilation, dim)
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                pads = tuple((0, 0) for _ in range(dim))
            elif layer.padding == "same":
                pads = []
                for k, d in zip(kernel, dilation):
                    total = d * (k - 1)
                    pads.append((total // 2, total - total // 2))   # torch's convention
                pads = tuple(pads)
            else:  # pragma: no cover - torch rejects other strings itself
                raise UnsupportedLayer(f"padding={layer.padding!r}")
        else:
            pads = tuple((p, p) for p in _tuple(layer.padding, dim))
        return cls(dim=dim, in_channels=layer.in_channels, out_channels=layer.out_channels,
                   kernel_size=kernel, stride=_tuple(layer.stride, dim), dilation=dilation,
                   padding=pads, padding_mode=layer.padding_mode, groups=layer.groups,
                   bias=layer.bias is not None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConvSpec":
        data = dict(data)
        for key in ("kernel_size", "stride", "dilation"):
            data[key] = tuple(data[key])
        data["padding"] = tuple(tuple(p) for p in data["padding"])
        return cls(**data)

    # ------------------------------------------------------------------ derived facts
    @property
    def is_linear(self) -> bool:
        return self.dim == 0

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size) if self.kernel_size else 1

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_volume == 1

    def output_size(self, input_size: Sequence[int], axes: Iterable[int] | None = None) -> tuple[int, ...]:
        """Spatial output size for ``input_size`` when the given axes are convolved (all by default)."""
        axes = set(range(self.dim)) if axes is None else set(axes)
        out = []
        for a, n in enumerate(input_size):
            if a in axes:
                lo, hi = self.padding[a]
                eff = self.dilation[a] * (self.kernel_size[a] - 1) + 1
                out.append((n + lo + hi - eff) // self.stride[a] + 1)
            else:
                out.append(n)
        return tuple(out)

    def dense_params(self) -> int:
        return self.out_channels * self.in_per_group * self.kernel_volume + (self.out_channels if self.bias else 0)

    def dense_macs(self, input_size: Sequence[int] = ()) -> int:
        return math.prod(self.output_size(input_size)) * self.out_channels * self.in_per_group * self.kernel_volume


class Pad(nn.Module):
    """``F.pad`` as a module. ``pad`` is in ``F.pad`` order (last axis first)."""

    def __init__(self, pad: Sequence[int], mode: str = "zeros"):
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pad, mode=_PAD_MODES[self.mode])

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}"


def make_conv(spec: ConvSpec, in_channels: int, out_channels: int, *, axes: Iterable[int] = (),
              groups: int = 1, bias: bool = False, kernel_size: Sequence[int] | None = None,
              dtype=None, device=None) -> nn.Module:
    """One piece of a factorized chain.

    The conv is ``dim``-dimensional; along each axis in ``axes`` it has the original kernel
    size (or ``kernel_size[a]`` if given), stride, dilation and padding; along the others it is
    1-wide with stride 1.  Returns a conv, or ``nn.Sequential(Pad, conv)`` when padding is
    asymmetric on a carried axis.  ``spec.dim == 0`` (Linear) gives an ``nn.Linear``.
    """
    if spec.is_linear:
        return nn.Linear(in_channels, out_channels, bias=bias, dtype=dtype, device=device)
    axes = set(axes)
    dim = spec.dim
    kernel = [1] * dim
    stride = [1] * dim
    dilation = [1] * dim
    pads = [(0, 0)] * dim
    for a in axes:
        kernel[a] = spec.kernel_size[a] if kernel_size is None else int(kernel_size[a])
        stride[a] = spec.stride[a]
        dilation[a] = spec.dilation[a]
        pads[a] = spec.padding[a]
    symmetric = all(lo == hi for lo, hi in pads)
    conv = conv_class(dim)(in_channels, out_channels, tuple(kernel), stride=tuple(stride),
                           padding=tuple(lo for lo, _ in pads) if symmetric else 0,
                           dilation=tuple(dilation), groups=groups, bias=bias,
                           padding_mode=spec.padding_mode if symmetric else "zeros",
                           dtype=dtype, device=device)
    if symmetric:
        return conv
    flat = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    return nn.Sequential(Pad(flat, spec.padding_mode), conv)


def conv_of(piece: nn.Module) -> nn.Module:
    """The conv (or Linear) inside a piece built by :func:`make_conv`."""
    if isinstance(piece, nn.Sequential):
        return piece[-1]
    return piece
