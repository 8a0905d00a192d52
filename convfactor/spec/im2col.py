"""An explicit im2col + GEMM convolution (unfold + matmul), exact against ``F.conv2d``.

The textbook lowering (Chellapilla et al. 2006; the "im2col" implementation discussed by Sedky &
Hosmer): every receptive field is copied into a column, ``cols: (B, C*kh*kw, Ho*Wo)``, and the
convolution becomes one matrix product per group,

    out[b, g] = W_g @ cols[b, g],   W_g: (N/g, C/g*kh*kw),   cols[b, g]: (C/g*kh*kw, Ho*Wo).

It materializes ``kh*kw`` copies of the input, which is why it costs memory; the ``im2col`` section of ``benchmarks/``
measures how much and how fast against the native convolution.

:class:`Im2ColConv2d` is a drop-in ``nn.Conv2d`` subclass using it (same parameters, same
``state_dict``), and :func:`use_im2col` swaps it into a model.  :func:`patches` is the same lowering
as rows, for any :class:`~.convspec.ConvSpec` (1/2/3-D, every padding mode): what data-aware fitting
and the rank facts regress on.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .convspec import PAD_MODES, ConvSpec

__all__ = ["conv2d_im2col", "Im2ColConv2d", "use_im2col", "patches"]


def patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """im2col for any conv of ``spec`` (padding mode, stride, dilation, 1/2/3-D), as rows.

    ``x: (B, C, *S)`` -> ``(B * prod(out), groups, C/groups * prod(kernel))`` in the order of
    ``weight.reshape(N, -1)``; a Linear's ``(P, C)`` -> ``(P, 1, C)``.
    """
    if spec.is_linear:
        return x.reshape(-1, 1, spec.in_channels)
    pad = []
    for lo, hi in reversed(spec.padding):
        pad += [lo, hi]
    if any(pad):
        x = F.pad(x, pad, mode=PAD_MODES[spec.padding_mode])
    for a, (k, s, d) in enumerate(zip(spec.kernel_size, spec.stride, spec.dilation)):
        x = x.unfold(2 + a, d * (k - 1) + 1, s)[..., ::d]
    # (B, C, *out, *k) -> (B, *out, C, *k)
    x = x.movedim(1, 1 + spec.dim)
    n_pos = math.prod(x.shape[:1 + spec.dim])
    return x.reshape(n_pos, spec.groups, spec.in_per_group * spec.kernel_volume)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, padding_mode: str = "zeros") -> torch.Tensor:
    """``F.conv2d`` semantics via unfold + matmul.

    ``x: (B, C, H, W)`` or ``(C, H, W)``; ``weight: (N, C/groups, kh, kw)``; ``padding``: an int, a pair,
    ``((top, bottom), (left, right))``, or ``'same'`` / ``'valid'``.  Returns ``(B, N, Ho, Wo)``.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"expected a 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, cg, kh, kw = weight.shape
    b, c = x.shape[:2]
    if c != cg * groups or n % groups:
        raise ValueError(f"channels do not match: input C={c}, weight {tuple(weight.shape)}, groups={groups}")
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0), (0, 0))
        elif padding == "same":
            tot = [d * (k - 1) for d, k in zip(dilation, (kh, kw))]
            pads = tuple((t // 2, t - t // 2) for t in tot)
        else:
            raise ValueError(f"padding={padding!r}")
    elif isinstance(padding, int) or isinstance(padding[0], int):
        pads = tuple((p, p) for p in _pair(padding))
    else:
        pads = tuple((int(p[0]), int(p[1])) for p in padding)
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode={padding_mode!r}")
    symmetric = all(a == z for a, z in pads)
    if padding_mode != "zeros" or not symmetric:
        (t, bo), (le, r) = pads
        if any(pads[0] + pads[1]):
            x = F.pad(x, (le, r, t, bo), mode=PAD_MODES[padding_mode])
        unfold_pad = (0, 0)
    else:
        unfold_pad = (pads[0][0], pads[1][0])
    h, w = x.shape[-2:]
    ho = (h + 2 * unfold_pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * unfold_pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=unfold_pad, stride=stride)     # (B, C*kh*kw, L)
    cols = cols.view(b, groups, cg * kh * kw, ho * wo)
    out = weight.reshape(1, groups, n // groups, cg * kh * kw) @ cols                      # (B, g, N/g, L)
    out = out.reshape(b, n, ho, wo)
    if bias is not None:
        out = out.add_(bias.view(1, n, 1, 1))         # in place: no second output-sized buffer
    return out.squeeze(0) if unbatched else out


class Im2ColConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`conv2d_im2col` (same parameters and state dict)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Im2ColConv2d":
        """A module sharing ``conv``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__ = conv.__dict__.copy()
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = ConvSpec.from_module(self)
        return conv2d_im2col(x, self.weight, self.bias, self.stride, spec.padding, self.dilation, self.groups,
                             self.padding_mode)


def use_im2col(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every plain ``nn.Conv2d`` computed by im2col + GEMM."""
    model = model if inplace else copy.deepcopy(model)
    if type(model) is nn.Conv2d:
        return Im2ColConv2d.from_conv(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d:
            model.set_submodule(name, Im2ColConv2d.from_conv(module))
    return model
