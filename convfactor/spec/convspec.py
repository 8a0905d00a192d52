"""Conv options, handled once for every method.

A :class:`ConvSpec` is a plain description of a ``nn.Conv1d/2d/3d``, a ``nn.ConvTranspose1d/2d/3d``
(or a ``nn.Linear``): channel counts, kernel size and, *per spatial axis*, stride, dilation and the
two sides of padding (``'same'`` and ``'valid'`` resolved to numbers), plus ``padding_mode``,
``groups``, bias, and for a transposed conv ``transposed=True`` and its ``output_padding``.

Every factorization is a chain of convolutions, each of which carries a *subset* of the
spatial axes (all of them for a kxk core, one for Tai et al.'s kx1 / 1xk pair, none for a 1x1).
:func:`make_conv` builds such a piece: the axes it carries get the original's stride, dilation
and padding on that axis, the others get 1 / 1 / 0.  This is exact because

* zero, reflect, replicate and circular padding are separable per axis (padding H then W gives
  the same tensor as padding both at once), and
* they commute with point-wise channel mixing (1x1 convs), which only acts on channels.

Asymmetric padding (``padding='same'`` with an even kernel) cannot be expressed by a conv's
``padding`` argument; :func:`make_conv` then prepends a :class:`Pad` module on that axis.

TensorFlow's dynamic "SAME" padding (timm's ``Conv2dSame``, used by every ``tf_*`` model) depends
on the input size: ``ConvSpec.dynamic_same`` records it, and :func:`make_conv` prepends a
:class:`SamePad` to each piece that carries a spatial axis, computing that axis's padding from the
piece's input at run time.  The SAME padding of an axis depends only on that axis's size, kernel,
stride and dilation, so it is separable per axis like the static paddings above.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ConvSpec", "Pad", "SamePad", "make_conv", "conv_class", "UnsupportedLayer", "is_conv",
           "is_dynamic_same", "PAD_MODES"]

#: Conv2d subclasses (matched by class name, so no import is needed) whose forward pads "SAME" at run time
DYNAMIC_SAME_CLASSES = ("Conv2dSame", "Conv2dSameExport")

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
#: a conv's ``padding_mode`` -> the ``F.pad`` mode that pads the same way
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class UnsupportedLayer(ValueError):
    """Raised when a layer (or one of its options) cannot be factorized by a method."""


def conv_class(dim: int, transposed: bool = False) -> type[nn.Module]:
    return (_TRANSPOSED_TYPES if transposed else _CONV_TYPES)[dim]


def is_conv(layer: nn.Module) -> bool:
    """True for ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and their subclasses."""
    return isinstance(layer, (*_CONV_TYPES.values(), *_TRANSPOSED_TYPES.values()))


def is_transposed(layer: nn.Module) -> bool:
    """True for ``nn.ConvTranspose1d/2d/3d`` and their subclasses."""
    return isinstance(layer, tuple(_TRANSPOSED_TYPES.values()))


def is_dynamic_same(layer: nn.Module) -> bool:
    """True for timm's ``Conv2dSame`` / ``Conv2dSameExport`` (or a subclass): TF "SAME" padding
    computed from the input size in ``forward``, on top of ``padding=0``."""
    return is_conv(layer) and any(c.__name__ in DYNAMIC_SAME_CLASSES for c in type(layer).__mro__)


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

    ``weight`` of the layer (:attr:`weight_shape`): ``(out_channels, in_channels // groups,
    *kernel_size)``, or ``(in_channels, out_channels // groups, *kernel_size)`` when ``transposed``.
    ``in_channels`` / ``out_channels`` are always those of the data flow (what goes in, what comes
    out).  ``output_padding`` is ``()`` unless ``transposed`` (then one value per axis); both have
    defaults, so recipes written before transposed convs were supported still load.
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
    dynamic_same: bool = False                 # TF "SAME" padding from the input size at run time (timm)
    transposed: bool = False                   # a ConvTranspose: weight (C, N/g, *k), see weight_shape
    output_padding: tuple[int, ...] = ()       # per spatial axis when transposed, else ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, layer: nn.Module) -> "ConvSpec":
        if isinstance(layer, nn.Linear):
            return cls(dim=0, in_channels=layer.in_features, out_channels=layer.out_features,
                       kernel_size=(), stride=(), dilation=(), padding=(), bias=layer.bias is not None)
        if not is_conv(layer):
            raise UnsupportedLayer(f"{type(layer).__name__} is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear")
        dim = len(layer.kernel_size)
        kernel = _tuple(layer.kernel_size, dim)
        dilation = _tuple(layer.dilation, dim)
        pads = _padding(layer.padding, kernel, dilation)
        same = is_dynamic_same(layer)              # its forward pads with zeros, then convolves unpadded
        transposed = is_transposed(layer)
        return cls(dim=dim, in_channels=layer.in_channels, out_channels=layer.out_channels,
                   kernel_size=kernel, stride=_tuple(layer.stride, dim), dilation=dilation,
                   padding=tuple((0, 0) for _ in range(dim)) if same else pads,
                   padding_mode="zeros" if same else layer.padding_mode, groups=layer.groups,
                   bias=layer.bias is not None, dynamic_same=same, transposed=transposed,
                   output_padding=_tuple(layer.output_padding, dim) if transposed else ())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConvSpec":
        """Inverse of :meth:`to_dict`; keys added later (``transposed``, ``output_padding``, ...)
        may be absent: they take their defaults, so old recipes load."""
        data = dict(data)
        for key in ("kernel_size", "stride", "dilation", "output_padding"):
            if key in data:
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
            if a in axes and self.dynamic_same:
                out.append(-(-n // self.stride[a]))          # "SAME": ceil(n / stride)
            elif a in axes and self.transposed:
                lo, hi = self.padding[a]
                eff = self.dilation[a] * (self.kernel_size[a] - 1) + 1
                out.append((n - 1) * self.stride[a] - lo - hi + eff + self.output_padding[a])
            elif a in axes:
                lo, hi = self.padding[a]
                eff = self.dilation[a] * (self.kernel_size[a] - 1) + 1
                out.append((n + lo + hi - eff) // self.stride[a] + 1)
            else:
                out.append(n)
        return tuple(out)

    def dense_params(self) -> int:
        return self.out_channels * self.in_per_group * self.kernel_volume + (self.out_channels if self.bias else 0)

    def dense_macs(self, input_size: Sequence[int] = ()) -> int:
        """MACs of the dense layer for one sample: ``C/g N k`` per output pixel, or per *input*
        pixel for a transposed conv (each input pixel is scattered through the whole kernel)."""
        pixels = math.prod(input_size) if self.transposed else math.prod(self.output_size(input_size))
        return pixels * self.out_channels * self.in_per_group * self.kernel_volume

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """``(N, C/g, *k)``, or ``(C, N/g, *k)`` for a transposed conv; ``(out, in)`` for a Linear."""
        if self.transposed:
            return (self.in_channels, self.out_per_group, *self.kernel_size)
        return (self.out_channels, self.in_per_group, *self.kernel_size)


def _padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A conv's ``padding`` argument as ``(before, after)`` per axis (``'same'`` / ``'valid'`` resolved)."""
    dim = len(kernel)
    if not isinstance(padding, str):
        return tuple((p, p) for p in _tuple(padding, dim))
    if padding == "valid":
        return tuple((0, 0) for _ in range(dim))
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)   # torch's convention
    raise UnsupportedLayer(f"padding={padding!r}")  # pragma: no cover - torch rejects other strings itself


class Pad(nn.Module):
    """``F.pad`` as a module. ``pad`` is in ``F.pad`` order (last axis first)."""

    def __init__(self, pad: Sequence[int], mode: str = "zeros"):
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pad, mode=PAD_MODES[self.mode])

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}"


class SamePad(nn.Module):
    """TensorFlow "SAME" zero padding computed from the input size, on some spatial axes (as timm's
    ``pad_same``): an axis of size ``n`` gets ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``
    in all, the smaller half before.  ``kernel_size``, ``stride``, ``dilation``: per spatial axis,
    kernel 1 / stride 1 on an axis that is not padded."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = []
        for n, k, s, d in reversed(list(zip(x.shape[2:], self.kernel_size, self.stride, self.dilation))):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pad += [total // 2, total - total // 2]
        return nn.functional.pad(x, pad) if any(pad) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def make_conv(spec: ConvSpec, in_channels: int, out_channels: int, *, axes: Iterable[int] = (),
              groups: int = 1, bias: bool = False, kernel_size: Sequence[int] | None = None,
              dtype=None, device=None) -> nn.Module:
    """One piece of a factorized chain.

    The conv is ``dim``-dimensional; along each axis in ``axes`` it has the original kernel
    size (or ``kernel_size[a]`` if given), stride, dilation and padding (and output_padding); along
    the others it is 1-wide with stride 1.  Returns a conv, or ``nn.Sequential(Pad, conv)`` when
    padding is asymmetric on a carried axis, or ``nn.Sequential(SamePad, conv)`` for
    ``spec.dynamic_same``.  ``spec.dim == 0`` (Linear) gives an ``nn.Linear``.
    For a transposed ``spec`` a piece carrying at least one axis is a ``ConvTranspose`` (its weight
    is ``(in_channels, out_channels/groups, *k)``); a piece carrying none is an ordinary 1x1 conv.
    """
    if spec.is_linear:
        return nn.Linear(in_channels, out_channels, bias=bias, dtype=dtype, device=device)
    axes = set(axes)
    options = _piece_options(spec, axes, kernel_size)
    pads = options.pop("pads")
    symmetric = all(lo == hi for lo, hi in pads)
    mode = spec.padding_mode if symmetric else "zeros"
    conv = conv_class(spec.dim, spec.transposed and bool(axes))(
        in_channels, out_channels, padding=tuple(lo for lo, _ in pads) if symmetric else 0, groups=groups,
        bias=bias, padding_mode=mode, dtype=dtype, device=device, **options)
    if spec.dynamic_same and axes:             # timm's Conv2dSame: pad from the input size at run time
        return nn.Sequential(SamePad(options["kernel_size"], options["stride"], options["dilation"]), conv)
    if symmetric:
        return conv
    flat = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    return nn.Sequential(Pad(flat, spec.padding_mode), conv)


def _piece_options(spec: ConvSpec, axes: set[int], kernel_size: Sequence[int] | None) -> dict:
    """Per-axis ``kernel_size``, ``stride``, ``dilation``, ``pads`` (and ``output_padding`` for a
    transposed piece) of a piece carrying ``axes``: the original's there, 1 / 1 / 1 / (0, 0) / 0 elsewhere."""
    dim = spec.dim
    out = {"kernel_size": [1] * dim, "stride": [1] * dim, "dilation": [1] * dim, "pads": [(0, 0)] * dim}
    transposed = spec.transposed and bool(axes)
    if transposed:
        out["output_padding"] = [0] * dim
    for a in axes:
        out["kernel_size"][a] = spec.kernel_size[a] if kernel_size is None else int(kernel_size[a])
        out["stride"][a] = spec.stride[a]
        out["dilation"][a] = spec.dilation[a]
        out["pads"][a] = spec.padding[a]
        if transposed:
            out["output_padding"][a] = spec.output_padding[a]
    return {k: tuple(v) for k, v in out.items()}


def conv_of(piece: nn.Module) -> nn.Module:
    """The conv (or Linear) inside a piece built by :func:`make_conv`."""
    if isinstance(piece, nn.Sequential):
        return piece[-1]
    return piece
