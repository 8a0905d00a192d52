"""Learned filter basis (Li, Gu, Van Gool, Timofte, "Learning Filter Basis for Convolutional Neural
Network Compression", ICCV 2019).

A conv ``weight: (N, C/g, *k)`` has N filters of ``C/g x k``.  Each filter is cut along its input
channels into ``s`` *splits* of ``p = C/(g s)`` channels, giving ``N s`` small
filters of ``p x k``.  They are written as combinations of one *basis* of ``m`` filters
(the paper's B, ``(m, p, *k)``) with *coefficients* (the paper's A, ``(N s, m)``), eq. 3 and 9-10::

    W[n, split j] ~= sum_i A[(n, j), i] B[i]

Forward (eq. 11): every split of the input is convolved with the same basis, which gives
``g s m`` channels, and a 1x1 conv with weight ``A: (N, s m)`` (``groups=g``) combines them.  The
basis conv carries the original stride, dilation, padding and padding mode; the 1x1 carries the bias.

*Initialization*: the optimal (B, A) for given (s, m) is the truncated SVD of the
``(N s) x (p prod(k))`` matrix of splits (Eckart-Young), so the squared truncation error equals the
discarded squared singular values.  ``s = 1`` is channel SVD (the same code path:
:func:`convfactor.methods.channel_svd.truncated_svd` on the same matrix) and ``s = C`` is the
channel-wise 2-D decomposition (a basis of ``m`` 2-D filters): the paper's unified formulation.

*Choosing s and m*: per basis filter the layer costs ``p k + N s`` parameters, so
eq. 6's kept fraction is ``m (C k / s + N s) / (N C k)`` (:func:`compression_ratio`), minimal at
``s* = sqrt(C k / N)`` (eq. 7; ``w sqrt(c/n)`` for a square ``w x w`` kernel), quantized here to the
divisor of ``C/g`` with the smallest cost (:func:`optimal_splits`).  ``splits=None`` means s*.
MACs per output pixel are ``m (C k + N s)``: the basis conv costs the same for every s, the 1x1
grows with s.

*Basis sharing* (the paper's block-, group- and network-wise sharing): ``compress`` rules with
``share`` give one ``nn.Parameter`` basis per group, each layer keeping its own coefficients and
bias.  Layers are grouped by :func:`share_groups`:

* ``'block'``: layers with the same parent module (the two convs of a residual block,
  e.g. ``layer1.0.conv1`` / ``layer1.0.conv2``, or ``body.3.body.0`` / ``body.3.body.2``);
* ``'group'``: layers whose names agree up to their first numeric component, i.e. all blocks of
  one stage (``layer1.*`` in a ResNet, ``body.*`` in EDSR); names without a numeric component
  fall back to ``'block'``;
* ``'network'``: every selected layer shares one basis; a layer with fewer channels per split
  uses a *channel prefix* of the basis (``B[:, :p]``, the paper's DenseNet Fig. 3);
* a list of lists of layer names or glob patterns: explicit groups.

Only layers with the same kernel size can share a basis: a share group is split by kernel.  The
shared basis is initialized by one SVD over all the group's splits (zero-padded to the widest
split), then, when splits differ in width, refined by ``refine`` (default 10) rounds of alternating
least squares on the exact prefix objective (no round raises the error).  A group's ``m`` is the
smallest of its layers' resolved ranks (so a ``macs_ratio`` budget holds for every layer); with
``share`` a rank may exceed one layer's own full rank (the basis also spans the other layers'
splits), up to the group's joint rank.

*Regularized fine-tuning* (eq. 12): :func:`basis_regularizer` gives
``gamma * sum_l ||W_l - B_l A_l||_F^2`` against the original weights, as a loss term: the sum of
each layer's :meth:`BasisConv2d.training_regularizer`, the hook fine-tuning adds up
(:func:`convfactor.methods.base.model_regularizer`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..spec.convspec import PAD_MODES, ConvSpec, make_conv
from .base import Cost, Factorized, Method, Ranks, copy_into, model_regularizer
from .linalg import truncated_svd, truncated_svd_flops

__all__ = ["Basis", "BasisConv2d", "SplitBasisConv", "basis_regularizer", "optimal_splits", "compression_ratio",
           "split_matrix", "share_groups", "joint_basis", "IMPLS", "CONCRETE_IMPLS", "DEFAULT_IMPL"]

#: forward implementations of the shared-weight conv (see :class:`SplitBasisConv`)
CONCRETE_IMPLS = ("batched", "split", "grouped", "conv3d")
IMPLS = ("auto",) + CONCRETE_IMPLS
#: 'batched' for NCHW inputs, 'grouped' for channels_last ones: the fastest pair on the benchmark
#: machine (BENCHMARKS.md, "Filter basis" section)
DEFAULT_IMPL = "auto"
SHARE_LEVELS = ("block", "group", "network")
#: alternating least-squares rounds refining a shared prefix basis (``refine=None``)
REFINE_ROUNDS = 10


# ---------------------------------------------------------------------------------------------- arithmetic
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def compression_ratio(spec: ConvSpec, m: int, s: int) -> float:
    """Eq. 6: kept fraction of the kernel's weights, ``m (p k + N s) / (N C/g k)`` (bias excluded)."""
    c, k = spec.in_per_group, spec.kernel_volume
    return m * (c * k / s + spec.out_channels * s) / (spec.out_channels * c * k)


def optimal_splits(spec: ConvSpec) -> int:
    """Eq. 7: ``s* = sqrt(C k / N)`` quantized to the divisor of ``C/g`` with the fewest parameters.

    ``C k / s + N s`` is convex in s, so the best divisor is one of the two around s*; ties go to
    the smaller s (fewer MACs in the 1x1).
    """
    c, k, n = spec.in_per_group, spec.kernel_volume, spec.out_channels
    return min(divisors(c), key=lambda s: (c * k / s + n * s, s))


def split_matrix(weight: torch.Tensor, splits: int) -> torch.Tensor:
    """``weight: (N, C/g, *k)`` -> the matrix of splits ``(N s, p prod(k))`` with ``p = C/(g s)``."""
    n, c = weight.shape[:2]
    return weight.reshape(n * splits, (c // splits) * math.prod(weight.shape[2:]))


# ---------------------------------------------------------------------------------------------- modules
def _conv_fn(dim: int):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]


class SplitBasisConv(nn.Module):
    """Every ``p``-channel split of the input convolved with one basis ``weight: (m, P, *k)``.

    Input ``(B, chunks * p, *S)`` -> output ``(B, chunks * m, *S')`` ordered (chunk, basis filter),
    or ordered (basis filter, chunk) for ``impl='conv3d'`` with ``m_major`` set.  When ``P > p``
    the layer uses the channel prefix ``weight[:, :p]`` of a wider shared basis.

    ``impl``: ``'batched'`` folds the splits into the batch (``(B, s p, H, W) -> (B s, p, H, W)``)
    and runs one conv; ``'split'`` runs one conv per split and concatenates; ``'grouped'`` runs
    one grouped conv with the basis tiled ``chunks`` times (tiled at every call, stored once);
    ``'conv3d'`` runs a 3-D conv whose depth kernel and stride are ``p`` (Conv2d layers only);
    ``'auto'`` (default) is ``'grouped'`` for a channels_last input and ``'batched'`` otherwise
    (folding a channels_last tensor into the batch costs a copy; a grouped conv on NCHW is slow).
    """

    def __init__(self, spec: ConvSpec, m: int, p: int, chunks: int, *, basis_channels: int | None = None,
                 impl: str = DEFAULT_IMPL, dtype=None, device=None):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"basis: impl={impl!r} is not one of {', '.join(IMPLS)}")
        if impl == "conv3d" and spec.dim != 2:
            raise ValueError(f"basis: impl='conv3d' needs a Conv2d layer (this is Conv{spec.dim}d)")
        width = p if basis_channels is None else int(basis_channels)
        if width < p:
            raise ValueError(f"basis: basis_channels={width} is narrower than the split width p={p}")
        self.weight = nn.Parameter(torch.empty(m, width, *spec.kernel_size, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.dim, self.p, self.width, self.chunks, self.impl = spec.dim, p, width, chunks, impl
        self.stride, self.dilation = spec.stride, spec.dilation
        self.m_major = False
        # Padding: passed to the conv when it is symmetric zero padding, else one F.pad first.
        symmetric = all(lo == hi for lo, hi in spec.padding)
        if spec.padding_mode == "zeros" and symmetric:
            self.pre_pad, self.conv_pad = None, tuple(lo for lo, _ in spec.padding)
        else:
            flat = []
            for lo, hi in reversed(spec.padding):
                flat += [lo, hi]
            self.pre_pad, self.conv_pad = tuple(flat), (0,) * spec.dim
        self.pad_mode = PAD_MODES[spec.padding_mode]

    def basis(self) -> torch.Tensor:
        """The basis this layer uses, ``(m, p, *k)``."""
        return self.weight if self.width == self.p else self.weight[:, : self.p]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is not None and any(self.pre_pad):
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        w = self.basis()
        conv = _conv_fn(self.dim)
        impl = self.impl
        if impl == "auto":
            channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous()
            impl = "grouped" if channels_last else "batched"
        if impl == "batched":
            z = conv(x.reshape(-1, self.p, *x.shape[2:]), w, None, self.stride, self.conv_pad, self.dilation)
            return z.reshape(-1, self.chunks * z.shape[1], *z.shape[2:])
        if impl == "split":
            return torch.cat([conv(xi, w, None, self.stride, self.conv_pad, self.dilation)
                              for xi in x.split(self.p, dim=1)], dim=1)
        if impl == "grouped":
            return conv(x, w.repeat(self.chunks, *([1] * (w.dim() - 1))), None, self.stride, self.conv_pad,
                        self.dilation, self.chunks)
        # conv3d: (B, 1, C, H, W) * (m, 1, p, kh, kw), depth stride p -> (B, m, chunks, H', W')
        z = F.conv3d(x.unsqueeze(1), w.unsqueeze(1), None, (self.p, *self.stride), (0, *self.conv_pad),
                     (1, *self.dilation))
        if not self.m_major:
            z = z.transpose(1, 2)
        return z.reshape(z.shape[0], -1, *z.shape[3:])

    def extra_repr(self) -> str:
        return (f"basis={tuple(self.weight.shape)}, p={self.p}, chunks={self.chunks}, impl={self.impl}, "
                f"stride={self.stride}, dilation={self.dilation}")


class BasisConv2d(Factorized):
    """The basis layer: ``basis`` (:class:`SplitBasisConv`, ``g s`` splits -> ``g s m`` channels)
    then ``combine`` (1x1 conv ``g s m -> N``, ``groups=g``, the coefficients A and the bias).

    A :class:`~convfactor.methods.base.Factorized` (so save/load and surgery know it); the forward
    is overridden only so that ``impl='conv3d'`` can use the (basis filter, split) channel order
    with a permuted view of the same coefficients.  Works for Conv1d/2d/3d despite its name.
    Its :meth:`training_regularizer` is eq. 12's penalty.
    """

    has_training_regularizer = True

    def __init__(self, spec: ConvSpec, m: int, splits: int, *, impl: str = DEFAULT_IMPL,
                 basis_channels: int | None = None, dtype=None, device=None, options: dict | None = None):
        g, p = spec.groups, spec.in_per_group // splits
        basis = SplitBasisConv(spec, m, p, g * splits, basis_channels=basis_channels, impl=impl, dtype=dtype,
                               device=device)
        basis.m_major = impl == "conv3d" and g == 1
        combine = make_conv(spec, g * splits * m, spec.out_channels, groups=g, bias=spec.bias, dtype=dtype,
                            device=device)
        if options is None:
            options = Basis(splits, impl, basis_channels if basis_channels != p else None).recipe()
        super().__init__(OrderedDict(basis=basis, combine=combine), method="basis", spec=spec, ranks=(m,),
                         options=options)
        self.splits = int(splits)
        # The original kernel, kept in memory (never saved) for eq. 12's penalty; see basis_regularizer.
        self.register_buffer("reference_weight", None, persistent=False)

    def coefficients(self) -> torch.Tensor:
        """A as ``(N, s m)`` ordered (split, basis filter)."""
        return self.combine.weight.reshape(self.spec.out_channels, -1)

    def training_regularizer(self, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 12's ``||W - B A||_F^2`` against ``reference`` (None: the kept ``reference_weight``),
        differentiable in the basis and the coefficients."""
        ref = self.reference_weight if reference is None else reference
        if ref is None:
            raise ValueError("no reference weight kept (e.g. it was loaded); pass original= (the uncompressed "
                             "model or name -> weight)")
        # reconstruct reads s off the shapes, so the default configuration serves every layer
        approx = Basis().reconstruct({"basis": self.basis.basis(), "coeff": self.coefficients()}, self.spec)
        return (approx - ref.detach().to(approx.dtype)).pow(2).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.basis(x)
        if not self.basis.m_major:
            return self.combine(z)
        w = self.combine.weight
        n, m = w.shape[0], self.ranks[0]
        w = w.reshape(n, self.splits, m, *w.shape[2:]).transpose(1, 2).reshape(w.shape)
        return F.conv2d(z, w, self.combine.bias)


# ---------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class Basis(Method):
    """``basis``: ranks ``(m,)``.  Options: ``splits`` (s; None: s* per layer, :func:`optimal_splits`),
    ``impl`` (see :class:`SplitBasisConv`), ``share`` (None, or a sharing level / explicit groups, see
    :func:`share_groups`: the rule's layers are fitted together, :meth:`factorize_shared`),
    ``refine`` (rounds refining a shared prefix basis; None: :data:`REFINE_ROUNDS`) and
    ``basis_channels`` (set per layer of a shared basis wider than its splits: the prefix it uses)."""

    splits: int | None = None
    impl: str = DEFAULT_IMPL
    basis_channels: int | None = None
    share: str | tuple[tuple[str, ...], ...] | None = None
    refine: int | None = None

    name = "basis"
    rank_names = ("m",)
    supported_dims = (1, 2, 3)
    supports_linear = False
    factor_names = ("basis", "coeff")

    def __post_init__(self):
        s = self.splits
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"basis: splits={s!r} must be a positive int (a divisor of the input channels)")
        if self.impl not in IMPLS:
            raise ValueError(f"basis: impl={self.impl!r} must be one of {', '.join(IMPLS)}")
        if self.share is not None:
            _check_share(self.share)
            if not isinstance(self.share, str):          # lists (JSON, YAML) -> tuples: a hashable value
                object.__setattr__(self, "share", tuple(tuple(group) for group in self.share))
        if self.refine is not None and (isinstance(self.refine, bool) or not isinstance(self.refine, int)
                                        or self.refine < 0):
            raise ValueError(f"basis: refine={self.refine!r} must be an int >= 0")

    # -------------------------------------------------------------- splits
    def splits_for(self, spec: ConvSpec) -> int:
        """The number of splits for ``spec``: ``splits``, else s* (:func:`optimal_splits`)."""
        s = self.splits
        if s is None:
            return optimal_splits(spec)
        if spec.in_per_group % s:
            raise ValueError(f"basis: splits={s!r} must be a positive divisor of the {spec.in_per_group} input "
                             f"channels (per group); divisors: {divisors(spec.in_per_group)}")
        return s

    def check(self, spec: ConvSpec) -> None:
        """Whether a filter basis applies to ``spec`` at all, judged at s*: a configured ``splits`` does not
        make a layer unsupported (:meth:`resolve_ranks` checks the ranks it allows)."""
        if self.splits is not None:
            return dataclasses.replace(self, splits=None).check(spec)
        return super().check(spec)

    def for_layer(self, spec: ConvSpec) -> "Basis":
        return dataclasses.replace(self, splits=self.splits_for(spec))

    # -------------------------------------------------------------- rank arithmetic
    def full_rank(self, spec: ConvSpec) -> Ranks:
        s = self.splits_for(spec)
        return (min(spec.out_channels * s, spec.in_per_group // s * spec.kernel_volume),)

    def max_rank(self, spec: ConvSpec) -> Ranks:
        """With ``share``, m may exceed this layer's own full rank (the shared basis also spans the other
        layers' splits) up to ``C/g prod(k)``; the group's joint limit is checked by :func:`joint_basis`."""
        if self.share is not None:
            return (spec.in_per_group * spec.kernel_volume,)
        return self.full_rank(spec)

    def resolve_ranks(self, spec: ConvSpec, weight: torch.Tensor | None = None, **target) -> Ranks:
        """As :meth:`Method.resolve_ranks`; a bad split or impl for this layer fails here, before
        anything is factorized."""
        self.splits_for(spec)
        if self.impl == "conv3d" and spec.dim != 2:
            raise ValueError(f"basis: impl='conv3d' needs a Conv2d layer (this is Conv{spec.dim}d)")
        return super().resolve_ranks(spec, weight, **target)

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        s = self.splits_for(spec)
        return [torch.linalg.svdvals(split_matrix(weight, s)).unsqueeze(0)]

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """One truncated SVD of the ``(N s, p prod(k))`` matrix of splits (a shared basis: of each layer's
        share of the stacked matrix, refinement rounds not counted)."""
        s = self.splits_for(spec)
        return truncated_svd_flops(spec.out_channels * s, spec.in_per_group // s * spec.kernel_volume, ranks[0])

    # -------------------------------------------------------------- math
    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration=None) -> dict[str, torch.Tensor]:
        """``weight: (N, C/g, *k)`` -> ``basis: (m, p, *k)``, ``coeff: (N, s m)`` (truncated SVD), and
        ``reference`` (the weight itself, which :meth:`build` keeps in memory for eq. 12)."""
        (m,) = ranks
        s = self.splits_for(spec)
        p = spec.in_per_group // s
        left, right = truncated_svd(split_matrix(weight, s), m)        # (N s, m), (m, p k)
        return {"basis": right.reshape(m, p, *spec.kernel_size),
                "coeff": left.reshape(spec.out_channels, s * m), "reference": weight}

    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        """``W[n, j-th split] = sum_i A[n, j, i] B[i]`` -> ``(N, C/g, *k)`` (s read off the shapes)."""
        basis, coeff = factors["basis"], factors["coeff"]
        m, p = basis.shape[:2]
        s = spec.in_per_group // p
        w = coeff.reshape(spec.out_channels, s, m) @ basis.reshape(m, -1)        # (N, s, p k)
        return w.reshape(spec.out_channels, s * p, *spec.kernel_size)

    def factors_of(self, module: BasisConv2d) -> dict[str, torch.Tensor]:
        return {"basis": module.basis.basis().detach().double(), "coeff": module.coefficients().detach().double()}

    def build(self, spec: ConvSpec, ranks: Ranks, factors=None, *, dtype=None, device=None) -> BasisConv2d:
        (m,) = ranks
        module = BasisConv2d(spec, m, self.splits_for(spec), impl=self.impl, basis_channels=self.basis_channels,
                             dtype=dtype, device=device, options=self.for_layer(spec).recipe())
        if factors is not None:
            with torch.no_grad():
                module.basis.weight[:, : module.basis.p].copy_(factors["basis"].to(module.basis.weight.dtype))
            copy_into(module.combine, factors["coeff"], factors.get("bias"))
            if factors.get("reference") is not None:
                module.reference_weight = factors["reference"].detach().to(module.combine.weight.dtype).clone()
        return module

    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """Params ``m p k + N s m (+ N)``; MACs per output pixel ``m C k + N s m`` (eq. 6's counts)."""
        (m,) = ranks
        s = self.splits_for(spec)
        p, k, n, g = spec.in_per_group // s, spec.kernel_volume, spec.out_channels, spec.groups
        out = math.prod(spec.output_size(input_size))
        return Cost(params=m * p * k + n * s * m + (n if spec.bias else 0),
                    macs=out * (g * s * m * p * k + n * s * m))

    # -------------------------------------------------------------- sharing
    @property
    def joint(self) -> bool:
        return self.share is not None

    def factorize_shared(self, layers: dict[str, nn.Module], ranks: dict[str, Ranks]) -> dict[str, BasisConv2d]:
        """Replacements for ``layers`` (name -> conv) whose bases are shared per :func:`share_groups`.

        A group uses ``m`` = the smallest of its layers' ranks (so every layer's budget holds).
        Returns name -> :class:`BasisConv2d`; modules of one group hold the same ``nn.Parameter``.
        """
        out = {}
        for group in share_groups(list(layers), self.share):
            by_kernel: dict[tuple, list[str]] = {}
            for name in group:
                spec = ConvSpec.from_module(layers[name])
                by_kernel.setdefault((spec.dim, spec.kernel_size), []).append(name)
            for names in by_kernel.values():
                out.update(self._share_one({n: layers[n] for n in names}, min(ranks[n][0] for n in names)))
        return out

    def _share_one(self, layers: dict[str, nn.Module], m: int) -> dict[str, BasisConv2d]:
        """One basis of ``m`` filters for ``layers`` (same kernel size), by :func:`joint_basis`."""
        specs = {n: ConvSpec.from_module(layer) for n, layer in layers.items()}
        for spec in specs.values():
            self.check(spec)
        splits = {n: self.splits_for(spec) for n, spec in specs.items()}
        widths = {n: specs[n].in_per_group // splits[n] for n in layers}
        mats = [split_matrix(layer.weight.detach().double(), splits[n]) for n, layer in layers.items()]
        basis, coeffs = joint_basis(mats, list(widths.values()), next(iter(specs.values())).kernel_size, m,
                                    refine=REFINE_ROUNDS if self.refine is None else self.refine)
        width = basis.shape[1]
        shared, modules = None, {}
        for (name, layer), coeff in zip(layers.items(), coeffs):
            spec, p = specs[name], widths[name]
            factors = {"basis": basis[:, :p], "coeff": coeff.reshape(spec.out_channels, splits[name] * m),
                       "reference": layer.weight}
            if layer.bias is not None:
                factors["bias"] = layer.bias.detach()
            own = dataclasses.replace(self, splits=splits[name], basis_channels=width if width != p else None)
            module = own.build(spec, (m,), factors, dtype=layer.weight.dtype, device=layer.weight.device)
            if shared is None:
                shared = module.basis.weight
                with torch.no_grad():
                    shared.copy_(basis.to(shared.dtype))
            else:
                module.basis.weight = shared
            modules[name] = module
        return modules


def joint_basis(mats: list[torch.Tensor], widths: list[int], kernel: Sequence[int], m: int, *,
                refine: int = REFINE_ROUNDS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One basis for several layers' split matrices.

    ``mats[l]: (R_l, p_l k)``; layer l uses the prefix ``B[:, :p_l]`` of ``B: (m, P, *kernel)`` with
    ``P = max p_l``.  Init: truncated SVD of all rows zero-padded to ``P`` channels (optimal when
    all ``p_l`` are equal).  Then ``refine`` rounds of alternating least squares on
    ``sum_l ||M_l - A_l B[:, :p_l]||^2`` (A-step per layer, B-step per band of channels that the
    same layers use); each round cannot increase the error.  Returns ``B`` and the ``A_l: (R_l, m)``.
    """
    k = math.prod(kernel)
    width = max(widths)
    cube = [mat.reshape(mat.shape[0], p, k) for mat, p in zip(mats, widths)]
    padded = torch.cat([F.pad(c, (0, 0, 0, width - c.shape[1])) for c in cube]).reshape(-1, width * k)
    rows = padded.shape[0]
    if m > min(rows, width * k):
        raise ValueError(f"basis: m={m} exceeds the shared rank limit min(rows={rows}, P*k={width * k})")
    left, right = truncated_svd(padded, m)
    basis = right.reshape(m, width, k)
    coeffs = list(left.split([c.shape[0] for c in cube]))
    if len(set(widths)) > 1:
        bounds = sorted(set(widths))
        for _ in range(refine):
            coeffs = [(torch.linalg.pinv(basis[:, :p].reshape(m, -1).T) @ c.reshape(c.shape[0], -1).T).T
                      for c, p in zip(cube, widths)]
            lo = 0
            for hi in bounds:
                users = [i for i, p in enumerate(widths) if p >= hi]
                a = torch.cat([coeffs[i] for i in users])                           # (R, m)
                target = torch.cat([cube[i][:, lo:hi].reshape(cube[i].shape[0], -1) for i in users])
                basis[:, lo:hi] = (torch.linalg.pinv(a) @ target).reshape(m, hi - lo, k)
                lo = hi
    return basis.reshape(m, width, *kernel), coeffs


def share_groups(names: list[str], share) -> list[list[str]]:
    """Partition layer ``names`` into basis-sharing groups (order kept); see the module docstring.

    ``share``: ``'block'`` | ``'group'`` | ``'network'`` | a list of lists of names / glob patterns
    (layers matching no list stay unshared).
    """
    _check_share(share)
    if isinstance(share, str):
        if share == "network":
            return [list(names)]
        keys = {}
        for name in names:
            parent = name.rpartition(".")[0]
            key = parent
            if share == "group":
                parts = name.split(".")
                idx = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
                key = ".".join(parts[:idx]) if idx is not None else parent
            keys.setdefault(key, []).append(name)
        return list(keys.values())
    groups: list[list[str]] = [[] for _ in share]
    rest = []
    for name in names:
        for i, patterns in enumerate(share):
            if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                groups[i].append(name)
                break
        else:
            rest.append([name])
    for patterns, group in zip(share, groups):
        if not group:
            raise ValueError(f"basis: share group {list(patterns)} matches none of the selected layers")
    return groups + rest


def _check_share(share) -> None:
    if isinstance(share, str):
        if share not in SHARE_LEVELS:
            raise ValueError(f"basis: share={share!r} must be one of {', '.join(SHARE_LEVELS)} or a list of lists "
                             f"of layer names")
    elif not isinstance(share, (list, tuple)) or not all(
            isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in share):
        raise ValueError(f"basis: share must be 'block', 'group', 'network' or a list of lists of layer names, "
                         f"got {share!r}")


# ---------------------------------------------------------------------------------------------- eq. 12
def basis_regularizer(model: nn.Module, original=None, gamma: float = 1.0) -> torch.Tensor:
    """Eq. 12's penalty ``gamma * sum_l ||W_l - B_l A_l||_F^2`` over the basis layers of ``model``.

    ``original``: the uncompressed model (same layer names) or a dict ``name -> weight (N, C/g, *k)``;
    None uses the original kernels that :func:`convfactor.factorize` / ``compress`` keep in each
    layer's non-persistent ``reference_weight`` buffer (not saved: after :func:`convfactor.load`,
    pass ``original``).  Differentiable in the bases and coefficients; add it to the task loss.
    """
    total = model_regularizer(model, original, gamma, kind=BasisConv2d, owner="basis_regularizer")
    if total is None:
        raise ValueError("basis_regularizer: the model has no basis layers")
    return total
