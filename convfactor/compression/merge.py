"""Exact merging of linear chains: :func:`merge`.

Where two linear operations follow each other with nothing non-linear between them, and nothing else
reads the tensor between them, they are replaced by one cheaper operation -- only where the MACs
drop, and only by rules that are exact everywhere, image borders included.

Adjacency.  ``nn.Sequential`` semantics: the output of child i is read only by child i+1.  Nested
plain ``nn.Sequential``s and subclasses that do not override ``forward`` (a
:class:`~convfactor.methods.base.Factorized` layer, EDSR's ``Upsampler``) are flattened into one
chain; ``nn.Identity`` is skipped.  A module with hooks, a container with its own ``forward``, a
module used at several places, or anything that is not a conv or a ``PixelShuffle`` ends a chain.
When an example input is given, the merged model's output is compared with the original's, and a
merge that changes it (something outside the Sequential reads the layers) is undone and reported.

The rules (``W_A: (M, C, ka)`` then ``W_B: (N, M, kb)``, biases ``b_A: (M,)``, ``b_B: (N,)``; ``*``
a convolution, ``pad`` the zero padding of B):

1. kxk -> 1x1 (B 1x1, padding 0, any stride s_B): ``B(A x) = (W_B W_A) * x + W_B b_A + b_B``, a conv
   with A's geometry and stride ``s_A s_B`` (subsampling a strided conv's output is the conv with the
   product stride).  A 1x1 sees no border, so this is exact everywhere.
2. 1x1 -> kxk (A 1x1, stride 1, padding 0; B any): ``W = W_B o W_A`` (``W[n,c] = sum_m W_B[n,m] W_A[m,c]``).
   A pointwise map commutes with reflect / replicate / circular padding and those pad a constant
   with itself, so there ``b = b_B + sum_{m,taps} W_B[n,m] b_A[m]``.  Zero padding pads A's output
   with zeros, not with ``b_A``: the constant's contribution then depends on the position, and is
   added exactly as a *bias field* ``field = W_sum * pad(ones(1, 1, H, W))`` with
   ``W_sum[n, 0] = sum_m W_B[n, m] b_A[m]`` (one input channel, same stride / padding / dilation as
   B), computed in ``forward`` from the input's size (:class:`BiasFieldConv2d`).
3. 1x1 -> 1x1: rule 1 with ``ka = 1``.
4. sub-pixel (Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient
   Sub-Pixel Convolutional Neural Network", CVPR 2016): a conv C (k, stride 1, dilation 1, zero
   padding ``(p_lo, p_hi)`` with ``p_lo + p_hi = k - 1``) after ``PixelShuffle(r)`` equals
   ``PixelShuffle(r)`` after an LR conv C' from ``r^2 C_in`` to ``r^2 C_out`` channels:
   ``C(PS(z)) = PS(C'(z))``.  HR output row ``r i + a`` reads HR row ``r i + t`` with
   ``t = a + u - p_lo`` (tap u), which is LR row ``i + d`` of phase ``phi``, ``(d, phi) = divmod(t, r)``,
   so ``C'[o r^2 + a r + b, c r^2 + phi_y r + phi_x, P + d_y, P + d_x] += C[o, c, u, v]`` with LR
   padding ``P = max |d|`` (k=3, p=1, r=2: 3x3 taps, P=1).  An HR row is outside the image exactly
   when its LR row is, so HR zero padding is LR zero padding and the identity is exact at borders;
   other padding modes, strides, dilations or sizes are refused with the reason.  C' alone costs
   ``r^2`` times C's MACs, so the rewrite is only made when C' then merges with the layer before the
   ``PixelShuffle`` by rule 1 or 2 (EDSR's tail after a channel SVD of its upsampler: the 1x1
   ``r -> 256`` and C' ``3x3 256 -> 12`` become one ``3x3 r -> 12`` conv with a bias field, and no
   conv runs at HR resolution any more).
5. any 1x1 conv (e.g. a ``MeanShift`` written as a fixed 1x1 ``Conv2d``) takes part by rules 1-3.

Merges repeat, the largest saving first, until no pair whose merge lowers the MACs is left.  MACs
are closed-form: per output pixel ``N C k`` (plus ``N k`` for a bias field), times the output size
at the example input's sizes (a nominal size without one).  The pieces of a factorization (the
``kxk -> 1x1`` of a channel SVD) are not re-merged: that would raise the MACs.  A pair left alone
is reported with its reason.  The merged structure is recorded on the model (:func:`merge_records`)
so :func:`convfactor.save` / :func:`convfactor.load` can rebuild it (:func:`replay_merges`).
"""
from __future__ import annotations

import copy
import math
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..methods.base import Factorized
from ..spec.convspec import is_conv, is_dynamic_same, is_transposed
from ..utils import as_inputs, eval_mode, format_si
from .calibration import clone_tree
from .safety import seeded
from .surgery import Placeholder, own_problem, set_submodule

__all__ = ["merge", "MergeSettings", "MergeReport", "MergedGroup", "SkippedPair", "BiasFieldConv2d", "MergedAway",
           "merge_records", "replay_merges", "module_from_description", "describe_module", "MERGE_LOG"]

#: the attribute of a merged model that records its merges, relative to that module (see :func:`merge_records`)
MERGE_LOG = "_convfactor_merges"
#: relative output error tolerated by the check of the merged model, by dtype (round-off of the merged weights)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass(frozen=True)
class MergeSettings:
    """``nominal_size``: a chain's input (H, W) when no example input shows it, for the MACs;
    ``subpixel``: use rule 4; ``within``: merge only groups with a layer at or under one of these
    paths (and the modules such merges produce), None: everywhere; ``check``: compare the merged
    model's output with the original's on the example input (and undo a merge that changes it)."""

    nominal_size: tuple[int, int] = (64, 64)
    subpixel: bool = True
    within: tuple[str, ...] | None = None
    check: bool = True


# ---------------------------------------------------------------------------- modules
class BiasFieldConv2d(nn.Module):
    """``conv(x) + field * pad(ones(1, 1, H, W))``: a conv plus the exact border term of rule 2.

    ``conv``: an ``nn.Conv2d`` (zero padding); ``field: (out_channels, 1, kh, kw)``, convolved with
    ``conv``'s stride, padding and dilation (kept here, so ``conv`` may later be factorized) over a ones
    image of the input's size (one channel, batch 1, broadcast over the batch).  Input
    ``(B, C, H, W)`` or ``(C, H, W)``; output as ``conv``'s."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        w = conv.weight
        self.field = nn.Parameter(torch.zeros(conv.out_channels, 1, *conv.kernel_size, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(x.narrow(-3, 0, 1).narrow(0, 0, 1))        # (1, 1, H, W), or (1, H, W) unbatched
        return self.conv(x) + F.conv2d(ones, self.field, None, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return f"field={tuple(self.field.shape)}"


class MergedAway(Placeholder):
    """The slot of a layer merged into the layer at ``into`` (an identity)."""


# ---------------------------------------------------------------------------- geometry and math
def _resolve_pads(padding, kernel, dilation) -> tuple[tuple[int, int], ...]:
    """A conv's ``padding`` attribute as ``(lo, hi)`` per axis ('same' / 'valid' resolved as torch does)."""
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((int(p), int(p)) for p in padding)


@dataclass(frozen=True)
class _Geo:
    """A Conv2d's geometry (and whether it has a bias / a bias field): enough for MACs and rebuilding."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)                 # the conv's attribute: (ph, pw), 'same' or 'valid'
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"
    groups: int = 1
    bias: bool = True
    field: bool = False

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        return _resolve_pads(self.padding, self.kernel, self.dilation)

    @property
    def pointwise(self) -> bool:
        return self.kernel == (1, 1)

    @property
    def padded(self) -> bool:
        return any(lo or hi for lo, hi in self.pads)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, (lo, hi), k, s, d in zip(size, self.pads, self.kernel, self.stride, self.dilation))

    def macs(self, size: tuple[int, int]) -> int:
        """Per sample at input ``size``: ``N C/g k`` per output pixel, plus ``N k`` for the bias field."""
        per_pixel = self.out_channels * (self.in_channels // self.groups + int(self.field)) * math.prod(self.kernel)
        return math.prod(self.out_size(size)) * per_pixel

    def describe(self) -> dict:
        data = asdict(self)
        data["type"] = "bias_field_conv2d" if data.pop("field") else "conv2d"
        return data


def _geo_of(module: nn.Module) -> _Geo:
    conv = module.conv if isinstance(module, BiasFieldConv2d) else module
    return _Geo(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.dilation),
                conv.padding_mode, conv.groups, conv.bias is not None, isinstance(module, BiasFieldConv2d))


@dataclass
class _Conv:
    """A conv as math, in float64: ``weight: (N, C, kh, kw)``, ``bias: (N,)`` or None, ``field:
    (N, 1, kh, kw)`` or None, and its geometry."""

    geo: _Geo
    weight: torch.Tensor
    bias: torch.Tensor | None
    field: torch.Tensor | None


def _conv_of(module: nn.Module) -> _Conv:
    conv = module.conv if isinstance(module, BiasFieldConv2d) else module
    field_ = module.field.detach().double() if isinstance(module, BiasFieldConv2d) else None
    bias = None if conv.bias is None else conv.bias.detach().double()
    return _Conv(_geo_of(module), conv.weight.detach().double(), bias, field_)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def _after_geo(a: _Geo, b: _Geo) -> _Geo | str:
    """Rule 1/3 (``b`` a 1x1 with padding 0): the merged geometry, or why it cannot be expressed."""
    stride = (a.stride[0] * b.stride[0], a.stride[1] * b.stride[1])
    padding = a.padding
    if isinstance(padding, str) and stride != (1, 1):
        pads = a.pads
        if any(lo != hi for lo, hi in pads):
            return "A pads 'same' asymmetrically and the 1x1 after it is strided (no single conv pads so)"
        padding = tuple(lo for lo, _ in pads)
    return _Geo(a.in_channels, b.out_channels, a.kernel, stride, padding, a.dilation, a.padding_mode, 1,
                a.bias or b.bias, a.field)


def _before_geo(a: _Geo, b: _Geo) -> _Geo:
    """Rule 2 (``a`` a 1x1, stride 1, padding 0): B's geometry on A's input channels; a bias field
    when A has a bias and B pads with zeros."""
    field_ = b.field or (a.bias and b.padding_mode == "zeros" and b.padded)
    bias = b.bias or (a.bias and not (b.padding_mode == "zeros" and b.padded))
    return _Geo(a.in_channels, b.out_channels, b.kernel, b.stride, b.padding, b.dilation, b.padding_mode, 1,
                bias, field_)


def pair_rule(a: _Geo, b: _Geo) -> tuple[str, _Geo] | str:
    """Which rule merges conv ``a`` then conv ``b`` exactly -> ``(rule, merged geometry)``, or the reason none does."""
    if a.groups != 1 or b.groups != 1:
        return f"groups: A has groups={a.groups}, B groups={b.groups} (only groups=1 pairs are merged)"
    if b.pointwise and not b.padded:
        merged = _after_geo(a, b)
        return merged if isinstance(merged, str) else ("1x1->1x1" if a.pointwise else "kxk->1x1", merged)
    if a.pointwise and a.stride == (1, 1) and not a.padded and not a.field:
        return "1x1->kxk", _before_geo(a, b)
    if b.pointwise:
        return f"B is a 1x1 with padding {b.pads} (its border outputs are its bias alone)"
    if a.pointwise and a.stride != (1, 1):
        return f"stride: the 1x1 A has stride {a.stride}; it subsamples before the kxk B (not a single conv)"
    if a.pointwise:
        return f"A is a 1x1 with padding {a.pads} (its border outputs are its bias alone)"
    return "two spatial convs (kxk->kxk): no exact merge (B's zero padding is not A's output there)"


def _merge_math(rule: str, a: _Conv, b: _Conv, geo: _Geo) -> _Conv:
    """The merged conv of :func:`pair_rule`'s ``rule`` (float64)."""
    if rule in ("kxk->1x1", "1x1->1x1"):
        wb = b.weight[:, :, 0, 0]                                               # (N, M)
        weight = torch.einsum("nm,mcyx->ncyx", wb, a.weight)
        bias = _plus(None if a.bias is None else wb @ a.bias, b.bias)
        field_ = None if a.field is None else torch.einsum("nm,myx->nyx", wb, a.field[:, 0])[:, None]
        return _Conv(geo, weight, bias, field_)
    wa = a.weight[:, :, 0, 0]                                                   # (M, C)
    weight = torch.einsum("nmyx,mc->ncyx", b.weight, wa)
    bias, field_ = b.bias, b.field
    if a.bias is not None:
        spread = torch.einsum("nmyx,m->nyx", b.weight, a.bias)                  # (N, kh, kw)
        if b.geo.padding_mode == "zeros" and b.geo.padded:          # position-dependent: the bias field
            field_ = _plus(field_, spread[:, None])
        else:
            bias = _plus(bias, spread.sum((1, 2)))
    return _Conv(geo, weight, bias, field_)


def _axis_taps(k: int, lo: int, r: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Per axis of the sub-pixel rule: ``(a, u, d, phi)`` for each output phase ``a`` and tap ``u``
    (LR offset ``d``, input phase ``phi``), and the LR padding ``P = max |d|``."""
    taps = [(a, u, *divmod(a + u - lo, r)) for a in range(r) for u in range(k)]
    return taps, max(abs(d) for _, _, d, _ in taps)


def subpixel_geo(c: _Geo, r: int) -> _Geo | str:
    """Rule 4: the LR conv C' with ``C(PixelShuffle(r)(z)) == PixelShuffle(r)(C'(z))``, or why not."""
    if c.groups != 1:
        return f"groups: the HR conv has groups={c.groups}"
    if c.stride != (1, 1):
        return f"stride: the HR conv has stride {c.stride} (the sub-pixel rule needs 1)"
    if c.dilation != (1, 1):
        return f"dilation in the HR conv ({c.dilation}); the sub-pixel rule needs 1"
    if c.padding_mode != "zeros":
        return (f"padding mode {c.padding_mode!r} with the sub-pixel rule: HR {c.padding_mode} padding is "
                "not LR padding of any kind")
    if c.field:
        return "the HR conv carries a bias field"
    if any(lo + hi != k - 1 for (lo, hi), k in zip(c.pads, c.kernel)):
        return (f"the HR conv (kernel {c.kernel}, padding {c.pads}) does not keep the size: its zero "
                "padding does not map onto LR zero padding")
    lr = [2 * _axis_taps(k, lo, r)[1] + 1 for k, (lo, _) in zip(c.kernel, c.pads)]
    return _Geo(r * r * c.in_channels, r * r * c.out_channels, tuple(lr), (1, 1), tuple(k // 2 for k in lr),
                (1, 1), "zeros", 1, c.bias, False)


def subpixel_math(c: _Conv, r: int, geo: _Geo) -> _Conv:
    """C' of :func:`subpixel_geo`: ``weight (N, C, kh, kw) -> (r^2 N, r^2 C, Kh, Kw)``, bias repeated per phase."""
    n, cin = c.geo.out_channels, c.geo.in_channels
    (ty, py), (tx, px) = (_axis_taps(k, lo, r) for k, (lo, _) in zip(c.geo.kernel, c.geo.pads))
    lr = torch.zeros(n, r, r, cin, r, r, *geo.kernel, dtype=c.weight.dtype, device=c.weight.device)
    for a, u, dy, fy in ty:
        for b, v, dx, fx in tx:
            lr[:, a, b, :, fy, fx, py + dy, px + dx] += c.weight[:, :, u, v]
    bias = None if c.bias is None else c.bias.repeat_interleave(r * r)
    return _Conv(geo, lr.reshape(n * r * r, cin * r * r, *geo.kernel), bias, None)


def _build(conv: _Conv, like: torch.Tensor, requires_grad: bool = True) -> nn.Module:
    """The module computing ``conv``, in ``like``'s dtype and device (a BiasFieldConv2d with a field)."""
    module = module_from_description(conv.geo.describe(), like.dtype, like.device)
    inner = module.conv if isinstance(module, BiasFieldConv2d) else module
    with torch.no_grad():
        inner.weight.copy_(conv.weight)
        if conv.bias is not None:
            inner.bias.copy_(conv.bias)
        if conv.field is not None:
            module.field.copy_(conv.field)
    for p in module.parameters():
        p.requires_grad_(requires_grad)
    return module


def module_from_description(desc: dict, dtype=None, device=None) -> nn.Module:
    """An uninitialized module from :func:`describe_module`'s record (what :func:`replay_merges` builds)."""
    kind = desc["type"]
    if kind == "merged_away":
        return MergedAway(desc.get("into", ""))
    if kind == "pixel_shuffle":
        return nn.PixelShuffle(int(desc["upscale_factor"]))
    if kind not in ("conv2d", "bias_field_conv2d"):
        raise ValueError(f"unknown merged module type {kind!r}")
    padding = desc["padding"] if isinstance(desc["padding"], str) else tuple(desc["padding"])
    conv = nn.Conv2d(desc["in_channels"], desc["out_channels"], tuple(desc["kernel"]), tuple(desc["stride"]),
                     padding, tuple(desc["dilation"]), desc.get("groups", 1), desc["bias"], desc["padding_mode"],
                     dtype=dtype, device=device)
    return BiasFieldConv2d(conv) if kind == "bias_field_conv2d" else conv


def describe_module(module: nn.Module) -> dict:
    """A JSON record of a module :func:`merge` places (conv, bias-field conv, PixelShuffle, MergedAway)."""
    if isinstance(module, MergedAway):
        return {"type": "merged_away", "into": module.into}
    if isinstance(module, nn.PixelShuffle):
        return {"type": "pixel_shuffle", "upscale_factor": module.upscale_factor}
    return _geo_of(module).describe()


# ---------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class MergedGroup:
    """Layers merged into one (``paths`` in chain order, ``into`` the slot of the merged conv);
    MACs per sample of those layers before and of the merged conv after."""

    paths: tuple[str, ...]
    rule: str
    into: str
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class SkippedPair:
    """Adjacent linear layers left as they are, with the reason (and the MACs when they were the reason)."""

    paths: tuple[str, ...]
    reason: str
    macs_before: int | None = None
    macs_after: int | None = None


@dataclass
class MergeReport:
    """What :func:`merge` did: merged groups (in the order merged) and skipped pairs, with reasons."""

    merged: list[MergedGroup] = field(default_factory=list)
    skipped: list[SkippedPair] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def macs_saved(self) -> int:
        return sum(g.macs_before - g.macs_after for g in self.merged)

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape) if self.input_shape else None,
                "merged": [{**asdict(g), "paths": list(g.paths)} for g in self.merged],
                "skipped": [{**asdict(s), "paths": list(s.paths)} for s in self.skipped],
                "macs_saved": self.macs_saved, "notes": list(self.notes)}

    def table(self) -> str:
        """Plain text: one line per merged group and per skipped pair, then the MACs saved."""
        if not self.merged and not self.skipped:
            return "\n".join(["merge: no adjacent linear layers to merge"] + [f"note: {n}" for n in self.notes])
        lines = [f"merged ({len(self.merged)}):" if self.merged else "merged: none"]
        for g in self.merged:
            lines.append(f"  {' + '.join(g.paths):<44} {g.rule:<22} MACs "
                         f"{format_si(g.macs_before)}->{format_si(g.macs_after)}  (into {g.into})")
        if self.skipped:
            lines.append(f"left as they are ({len(self.skipped)}):")
            lines += [f"  {' + '.join(s.paths):<44} {s.reason}" for s in self.skipped]
        lines.append(f"MACs saved by merging: {format_si(self.macs_saved)} per sample")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ---------------------------------------------------------------------------- chains
@dataclass
class _Op:
    """A layer in a chain: ``kind`` "conv" or "shuffle"; ``problem``: why it can take part in no merge."""

    path: str
    module: nn.Module
    kind: str
    problem: str | None = None


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _flat(module: nn.Module, places: Counter) -> bool:
    """A Sequential whose children run one after the other, each reading only the previous output."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and not _hooked(module) and places[id(module)] == 1)


def _transparent(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward and not _hooked(module)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (BiasFieldConv2d, nn.Linear)) or is_conv(module):
        return "conv"
    if isinstance(module, nn.PixelShuffle) and type(module).forward is nn.PixelShuffle.forward:
        return "shuffle"
    return None


def _op_problem(module: nn.Module, path: str, places: Counter) -> str | None:
    if _hooked(module) or (isinstance(module, BiasFieldConv2d) and _hooked(module.conv)):
        return f"{path} has hooks (they may read or change its tensors)"
    if places[id(module)] > 1:
        return f"{path} is used at several places"
    if isinstance(module, BiasFieldConv2d) and type(module.conv) is not nn.Conv2d:
        return f"{path}.conv is no longer a plain Conv2d ({type(module.conv).__name__})"
    if isinstance(module, (BiasFieldConv2d, nn.PixelShuffle)):
        return None
    if not isinstance(module, nn.Conv2d) or is_transposed(module):
        return f"only Conv2d layers are merged ({path} is a {type(module).__name__})"
    if is_dynamic_same(module):
        return f"{path} pads 'SAME' at run time ({type(module).__name__})"
    problem = own_problem(module)
    return f"{path}: {problem}" if problem else None


def _leaves(module: nn.Module, path: str, places: Counter, seen: set):
    """``(path, child)`` of a flat Sequential, nested flat Sequentials expanded in place."""
    for name, child in module.named_children():
        child_path = _join(path, name)
        if _flat(child, places):
            seen.add(id(child))
            yield from _leaves(child, child_path, places, seen)
        else:
            yield child_path, child


def _collect(module: nn.Module, path: str, places: Counter, seen: set, chains: list) -> None:
    """Append to ``chains`` the chains of linear layers in ``module`` and below."""
    if id(module) in seen:
        return
    seen.add(id(module))
    if not _flat(module, places):
        for name, child in module.named_children():
            _collect(child, _join(path, name), places, seen, chains)
        return
    current: list[_Op] = []
    for child_path, child in _leaves(module, path, places, seen):
        if _transparent(child):
            continue
        kind = _kind(child)
        if kind is None:                        # a barrier: close the chain, look inside it
            chains.append(current)
            current = []
            _collect(child, child_path, places, seen, chains)
        else:
            current.append(_Op(child_path, child, kind, _op_problem(child, child_path, places)))
    chains.append(current)


def _chains(model: nn.Module) -> list[list[_Op]]:
    """The chains of adjacent linear layers (at least two) of ``model``, by Sequential semantics."""
    places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    chains: list[list[_Op]] = []
    _collect(model, "", places, set(), chains)
    return [c for c in chains if len(c) > 1]


def _candidates(chain: list[_Op]) -> list[list[_Op]]:
    """Conv pairs, and ``conv, PixelShuffle, conv`` triples (rule 4), in chain order."""
    out = []
    for i, (op, nxt) in enumerate(zip(chain, chain[1:])):
        if op.kind == "conv" and nxt.kind == "conv":
            out.append([op, nxt])
        elif op.kind == "conv" and nxt.kind == "shuffle" and i + 2 < len(chain) and chain[i + 2].kind == "conv":
            out.append([op, nxt, chain[i + 2]])
    return out


# ---------------------------------------------------------------------------- planning
@dataclass
class _State:
    """One :func:`merge` run: captured input sizes by path, the paths merges produced (``touched``),
    plans refused by the output check, and what was done (report groups, recipe log, undo stack)."""

    settings: MergeSettings
    captured: dict[str, tuple[int, int]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    blocked: dict[tuple[str, ...], str] = field(default_factory=dict)
    merged: list[MergedGroup] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    undo: list[tuple[str, nn.Module]] = field(default_factory=list)

    def restart(self) -> None:
        self.sizes, self.touched, self.merged, self.log, self.undo = dict(self.captured), set(), [], [], []

    def in_scope(self, ops: list[_Op]) -> bool:
        within = self.settings.within
        return within is None or any(op.path in self.touched or any(
            op.path == w or op.path.startswith(w + ".") or not w for w in within) for op in ops)


@dataclass
class _Plan:
    """A profitable-or-not merge of ``ops``: ``pair`` the rule of :func:`pair_rule`, ``lr`` the LR conv
    of rule 4 (None for a pair), ``geo`` the merged conv, ``size`` the input size of ``ops[0]``."""

    ops: list[_Op]
    rule: str
    pair: str
    geo: _Geo
    lr: _Geo | None
    size: tuple[int, int]
    macs_before: int
    macs_after: int

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(op.path for op in self.ops)


def _out_size(op: _Op, size: tuple[int, int]) -> tuple[int, int]:
    if op.kind == "shuffle":
        return (size[0] * op.module.upscale_factor, size[1] * op.module.upscale_factor)
    m = op.module
    if isinstance(m, BiasFieldConv2d):          # its own geometry: its conv may have been factorized since
        padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        return _Geo(0, 0, tuple(m.field.shape[2:]), tuple(m.stride), padding, tuple(m.dilation)).out_size(size)
    if isinstance(m, nn.Conv2d) and not is_transposed(m):
        return _geo_of(m).out_size(size)
    return size


def _chain_sizes(chain: list[_Op], state: _State) -> list[tuple[int, int]]:
    """The input (H, W) of each layer: captured on the example input, else propagated from the
    chain's first layer (the nominal size when that one was not seen either)."""
    size, sizes = state.sizes.get(chain[0].path, state.settings.nominal_size), []
    for op in chain:
        size = state.sizes.get(op.path, size)
        sizes.append(size)
        size = _out_size(op, size)
    return sizes


def _evaluate(ops: list[_Op], sizes: list[tuple[int, int]], state: _State) -> _Plan | str:
    """The merge of ``ops`` (a pair, or conv / PixelShuffle / conv) with its MACs, or why there is none."""
    problem = next((op.problem for op in ops if op.problem), None)
    key = tuple(op.path for op in ops)
    if problem or key in state.blocked:
        return problem or state.blocked[key]
    a, c = _geo_of(ops[0].module), _geo_of(ops[-1].module)
    lr = None
    if len(ops) == 3:
        if not state.settings.subpixel:
            return "the sub-pixel rule is off (MergeSettings.subpixel=False)"
        lr = subpixel_geo(c, ops[1].module.upscale_factor)
        if isinstance(lr, str):
            return lr
    found = pair_rule(a, lr or c)
    if isinstance(found, str):
        return found if lr is None else f"after the sub-pixel rewrite: {found}"
    pair, geo = found
    return _Plan(ops, pair if lr is None else f"subpixel+{pair}", pair, geo, lr, sizes[0],
                 a.macs(sizes[0]) + c.macs(sizes[-1]), geo.macs(sizes[0]))


def _survey(work: nn.Module, state: _State) -> tuple[list[_Plan], list[SkippedPair]]:
    """Every candidate in scope: the merges that lower the MACs, and the others with their reasons."""
    plans, skipped = [], []
    for chain in _chains(work):
        sizes = _chain_sizes(chain, state)
        where = {id(op): i for i, op in enumerate(chain)}
        for ops in _candidates(chain):
            if not state.in_scope(ops):
                continue
            i = where[id(ops[0])]
            result = _evaluate(ops, sizes[i:i + len(ops)], state)
            paths = tuple(op.path for op in ops)
            if isinstance(result, str):
                skipped.append(SkippedPair(paths, result))
            elif result.macs_after < result.macs_before:
                plans.append(result)
            else:
                skipped.append(SkippedPair(paths, f"{result.rule}: the MACs would rise ({format_si(result.macs_before)}"
                                                  f" -> {format_si(result.macs_after)})",
                                           result.macs_before, result.macs_after))
    return plans, skipped


# ---------------------------------------------------------------------------- applying
def _plain(layer: nn.Module) -> nn.Sequential:
    """``layer`` (a Factorized) as a plain Sequential of the same children: once a merge reaches into
    it, its pieces no longer are what its recipe describes."""
    plain = nn.Sequential(OrderedDict(layer.named_children()))
    plain.train(layer.training)
    return plain


def _demote(work: nn.Module, slots: Iterable[str], state: _State) -> dict[str, dict]:
    """Turn each Factorized layer holding one of ``slots`` into a plain Sequential -> ``{path: recipe}``."""
    demoted = {}
    above = {".".join(p.split(".")[:i]) for p in slots for i in range(1, p.count(".") + 1)}
    for name in sorted(above):
        module = work.get_submodule(name)
        if isinstance(module, Factorized):
            demoted[name] = module.recipe()
            state.undo.append((name, module))
            set_submodule(work, name, _plain(module))
    return demoted


def _new_modules(plan: _Plan) -> dict[str, nn.Module]:
    """The slots of ``plan`` -> their new modules: the merged conv in the last conv's slot (or, for
    rule 4, in the PixelShuffle's slot, with the PixelShuffle moved after it), MergedAway before."""
    ops = plan.ops
    a, c = _conv_of(ops[0].module), _conv_of(ops[-1].module)
    if plan.lr is not None:
        c = subpixel_math(c, ops[1].module.upscale_factor, plan.lr)
    grad = any(p.requires_grad for op in (ops[0], ops[-1]) for p in op.module.parameters())
    new = _build(_merge_math(plan.pair, a, c, plan.geo), _conv_of_weight(ops[0].module), grad)
    into = ops[1].path
    slots = {ops[0].path: MergedAway(into), into: new}
    if plan.lr is not None:
        slots[ops[2].path] = nn.PixelShuffle(ops[1].module.upscale_factor)
    for module in slots.values():
        module.train(ops[0].module.training)
    return slots


def _conv_of_weight(module: nn.Module) -> torch.Tensor:
    return (module.conv if isinstance(module, BiasFieldConv2d) else module).weight


def _apply(work: nn.Module, plan: _Plan, state: _State) -> None:
    """Do ``plan`` on ``work``; record it in ``state`` (report, recipe log, undo stack, sizes)."""
    slots = _new_modules(plan)
    entry = {"rule": plan.rule, "paths": list(plan.key), "demoted": _demote(work, slots, state),
             "slots": {path: describe_module(module) for path, module in slots.items()}}
    for path, module in slots.items():
        state.undo.append((path, work.get_submodule(path)))
        set_submodule(work, path, module)
    into = plan.ops[1].path
    state.sizes.pop(plan.ops[0].path, None)
    state.sizes[into] = plan.size
    if plan.lr is not None:
        state.sizes[plan.ops[2].path] = plan.geo.out_size(plan.size)
    state.touched.update(slots)
    state.log.append(entry)
    state.merged.append(MergedGroup(plan.key, plan.rule, into, plan.macs_before, plan.macs_after))


def _undo(work: nn.Module, state: _State, mark: int) -> None:
    while len(state.undo) > mark:
        path, module = state.undo.pop()
        set_submodule(work, path, module)


def _merge_loop(work: nn.Module, state: _State, check: Callable[[], str | None] | None) -> list[SkippedPair]:
    """Merge the largest saving first until none is left; with ``check``, after each merge, undo and
    block a merge that changes the model's output.  Returns the pairs left, with reasons."""
    while True:
        plans, skipped = _survey(work, state)
        if not plans:
            return skipped
        for plan in _disjoint(plans)[:1 if check is not None else None]:
            mark, sizes, touched = len(state.undo), dict(state.sizes), set(state.touched)
            _apply(work, plan, state)
            problem = check() if check is not None else None
            if problem:
                _undo(work, state, mark)
                state.sizes, state.touched = sizes, touched
                state.log.pop()
                state.merged.pop()
                state.blocked[plan.key] = (f"merging changed the model's output ({problem}): something outside "
                                           "the Sequential uses these layers")


def _disjoint(plans: list[_Plan]) -> list[_Plan]:
    """The largest saving first, then each plan that shares no layer with one taken (one pass merges
    them all; they are independent, so doing them at once is doing them one after the other)."""
    taken, used = [], set()
    for plan in sorted(plans, key=lambda p: p.macs_after - p.macs_before):
        if used.isdisjoint(plan.key):
            taken.append(plan)
            used.update(plan.key)
    return taken


# ---------------------------------------------------------------------------- running the model
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _difference(got: Any, want: Any) -> str | None:
    """Why ``got`` is not ``want`` within the round-off of merged weights (:data:`TOLERANCE`), or None."""
    got_t, want_t = _tensors(got), _tensors(want)
    if len(got_t) != len(want_t):
        return "a different output structure"
    for g, w in zip(got_t, want_t):
        if g.shape != w.shape:
            return f"shape {tuple(g.shape)} instead of {tuple(w.shape)}"
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return "a different output"
            continue
        err = float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300))
        if not err <= TOLERANCE.get(w.dtype, 1e-2):
            return f"relative error {err:.2e}"
    return None


@torch.no_grad()
def _run(work: nn.Module, inputs: tuple) -> Any:
    with eval_mode(work), seeded():
        return work(*clone_tree(inputs))


def _check(work: nn.Module, inputs: tuple, reference: Any) -> str | None:
    try:
        got = _run(work, inputs)
    except Exception as exc:         # noqa: BLE001 - any failure of the merged model is the answer
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return _difference(got, reference)


def _capture(work: nn.Module, inputs: tuple, state: _State) -> Any:
    """Run ``work`` once: each chain layer's input (H, W) into ``state``; returns the output."""
    handles = []
    for chain in _chains(work):
        for op in chain:
            def hook(module, args, path=op.path):
                if path not in state.captured and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
                    state.captured[path] = tuple(args[0].shape[-2:])
            handles.append(op.module.register_forward_pre_hook(hook))
    try:
        return _run(work, inputs)
    finally:
        for handle in handles:
            handle.remove()
        state.sizes = dict(state.captured)


# ---------------------------------------------------------------------------- the API
def merge(model: nn.Module, example_input=None, *, inplace: bool = False,
          settings: MergeSettings | None = None) -> tuple[nn.Module, MergeReport]:
    """Merge adjacent linear layers of ``model`` exactly where that lowers the MACs (module docstring).

    ``example_input`` (a tensor or a tuple; never modified) gives the layers' sizes for the MACs and
    lets the merged model's output be checked against the original's (a merge that changes it is
    undone and reported).  Returns ``(merged model, MergeReport)``; ``model`` is modified only with
    ``inplace``.  The merges are recorded on the returned model for :func:`convfactor.save`.
    """
    settings = settings or MergeSettings()
    work = model if inplace else copy.deepcopy(model)
    inputs = None if example_input is None else as_inputs(example_input)
    first = inputs[0] if inputs else None
    report = MergeReport(input_shape=tuple(first.shape) if isinstance(first, torch.Tensor) else None)
    state = _State(settings)
    if not any(state.in_scope(ops) for chain in _chains(work) for ops in _candidates(chain)):
        return work, report
    reference = _capture(work, inputs, state) if inputs is not None else None
    report.skipped = _merge_loop(work, state, None)
    if state.merged and reference is not None and settings.check:
        problem = _check(work, inputs, reference)
        if problem:
            _undo(work, state, 0)
            state.restart()
            report.notes.append(f"the merged model's output changed ({problem}); merges were redone one at a "
                                "time, each checked on the example input")
            report.skipped = _merge_loop(work, state, lambda: _check(work, inputs, reference))
    elif state.merged and reference is None:
        report.notes.append(f"no example input: MACs at a nominal {settings.nominal_size} chain input, and the "
                            "merges were not checked on the model's output (Sequential semantics assumed)")
    if state.log:
        setattr(work, MERGE_LOG, list(getattr(work, MERGE_LOG, [])) + state.log)
    report.merged = list(state.merged)
    return work, report


# ---------------------------------------------------------------------------- save / load
def _prefixed(entry: dict, prefix: str) -> dict:
    if not prefix:
        return copy.deepcopy(entry)
    add = lambda p: f"{prefix}.{p}"              # noqa: E731
    return {**copy.deepcopy(entry), "paths": [add(p) for p in entry["paths"]],
            "demoted": {add(p): copy.deepcopy(r) for p, r in entry.get("demoted", {}).items()},
            "slots": {add(p): dict(d) for p, d in entry["slots"].items()}}


def merge_records(model: nn.Module) -> list[dict]:
    """The merges done on ``model`` (and its submodules), in order, with paths from ``model``: per
    merge, ``rule``, ``paths``, ``demoted`` (``{path: recipe}`` of the Factorized layers it reached
    into, rebuilt then unwrapped on load) and ``slots`` (``{path: module record}``, see
    :func:`describe_module`).  What :func:`convfactor.save` writes under ``"merged"``."""
    return [_prefixed(entry, prefix) for prefix, module in model.named_modules()
            for entry in (getattr(module, MERGE_LOG, None) or ())]


def replay_merges(model: nn.Module, entries: list[dict], rebuild: Callable[[str, dict], nn.Module]) -> None:
    """Redo the structure of :func:`merge_records`'s ``entries`` on ``model``, in place, uninitialized
    (the values come from the saved state).  ``rebuild(path, recipe)``: the empty Factorized layer a
    demoted recipe describes (:func:`convfactor.io.load` checks it against the base model)."""
    like = next(model.parameters(), None)
    dtype, device = (None, None) if like is None else (like.dtype, like.device)
    for entry in entries:
        for path, recipe in entry.get("demoted", {}).items():
            set_submodule(model, path, _plain(rebuild(path, recipe)))
        for path, desc in entry["slots"].items():
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"the recipe merges layer {path!r}, which the model does not have") from None
            set_submodule(model, path, module_from_description(desc, dtype, device))
    if entries:
        setattr(model, MERGE_LOG, copy.deepcopy(list(entries)))
