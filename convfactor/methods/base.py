"""The contract every factorization method implements: the :class:`Method` ABC.

Where the methods sit in the package: see the README, section "Architecture".

A *configured method* is a frozen dataclass: its fields are the method's options (``cp``:
``form``, ``n_iter``, ...; ``tt``: the mode shapes; ``basis``: ``splits``, ``impl``, ``share``),
so ``registry.get("cp", form="folded")`` is a value that every hook below reads from ``self``.
The hooks the rest of the package calls, and nothing else:

* class attributes: ``name``, ``n_ranks``, ``rank_names``, ``supports_linear``, ``supported_dims``,
  ``supports_transposed``, ``supports_energy``, ``uses_calibration`` and ``factor_names`` (required);
* rank arithmetic: :meth:`~Method.full_rank` (abstract), :meth:`~Method.max_rank`,
  :meth:`~Method.expand_rank`, :meth:`~Method.validate_ranks`, :meth:`~Method.scaled_ranks`,
  :meth:`~Method.ranks_for_macs` and :meth:`~Method.resolve_ranks` (a ``rank`` / ``macs_ratio`` /
  ``energy`` target to a tuple of ints), with :meth:`~Method.spectra` for ``energy`` targets;
* :meth:`~Method.factorize` (abstract): pure tensor math, ``weight: (N, C/groups, *kernel)`` in
  float64 in, a dict of named factor tensors out (names from ``factor_names``);
* :meth:`~Method.build` (abstract): the drop-in replacement, a :class:`Factorized` (an
  ``nn.Sequential`` of ordinary convs) carrying every conv option via
  :func:`convfactor.spec.convspec.make_conv`;
* :meth:`~Method.cost` (abstract): closed-form ``(params, macs)`` for a spatial input size, and
  :meth:`~Method.factorization_cost`: the estimated flops of :meth:`~Method.factorize` itself;
* :meth:`~Method.reconstruct` (abstract): factors back to a dense kernel, and
  :meth:`~Method.factors_of`: the factors a built module holds;
* :meth:`~Method.factorize_shared` with :attr:`~Method.joint`: several layers fitted together;
* :meth:`~Method.for_layer` and :meth:`~Method.recipe`: what :func:`convfactor.save` records.

A built :class:`Factorized` module may add a loss term to fine-tuning through
:meth:`Factorized.training_regularizer` (the filter basis's eq. 12); :func:`model_regularizer` sums them.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..spec.convspec import ConvSpec, UnsupportedLayer, conv_of
from .linalg import svd_flops

__all__ = ["Method", "Factorized", "Cost", "Ranks", "LayerTarget", "energy_rank", "check_target",
           "AUXILIARY_FACTORS", "method_key", "regularized_layers", "model_regularizer"]

Ranks = tuple[int, ...]

#: tensors that travel with the factors to :meth:`Method.build` without being factors: the layer's
#: bias (added by the API), a bias correction from a response fit, the original kernel (basis, eq. 12)
AUXILIARY_FACTORS = ("bias", "bias_shift", "reference")


@dataclass(frozen=True)
class Cost:
    """Closed-form cost of a layer. ``macs`` are multiply-accumulates (FLOPs / 2), not time."""

    params: int
    macs: int


class Factorized(nn.Sequential):
    """A factorized layer: an ``nn.Sequential`` of ordinary layers plus the recipe that made it.

    ``method``, ``ranks``, ``spec`` and ``options`` are what :func:`convfactor.save` writes to the
    JSON recipe, and what :func:`convfactor.load` rebuilds the empty module from; ``options`` is
    the configured method's :meth:`Method.recipe` for this layer.
    """

    #: whether :meth:`training_regularizer` gives a loss term (fine-tuning then adds it, see
    #: :func:`model_regularizer`)
    has_training_regularizer: ClassVar[bool] = False

    def __init__(self, *pieces: nn.Module, method: str, spec: ConvSpec, ranks: Ranks,
                 options: dict | None = None):
        super().__init__(*pieces)
        self.method = method
        self.spec = spec
        self.ranks = tuple(int(r) for r in ranks)
        self.options = dict(options or {})

    def recipe(self) -> dict:
        return {"method": self.method, "ranks": list(self.ranks), "spec": self.spec.to_dict(),
                "options": self.options}

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"

    def training_regularizer(self, reference: torch.Tensor | None = None) -> torch.Tensor | None:
        """A differentiable loss term fine-tuning adds for this layer (times ``basis_weight``), or None:
        the default, no term.  ``reference``: the weight of the layer this one replaced (None: what
        the module kept of it); a ValueError when it is needed and missing."""
        return None


def regularized_layers(model: nn.Module, kind: type[Factorized] = Factorized) -> list[tuple[str, Factorized]]:
    """``(name, module)`` of every ``kind`` module of ``model`` with a training regularizer, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and m.has_training_regularizer]


def model_regularizer(model: nn.Module, original=None, gamma: float = 1.0, *, kind: type[Factorized] = Factorized,
                      owner: str = "model_regularizer") -> torch.Tensor | None:
    """``gamma`` times the sum of :meth:`Factorized.training_regularizer` over the layers of
    :func:`regularized_layers` (None when there is none).

    ``original``: the uncompressed model (same layer names) or a dict ``name -> weight``, whose
    weights are the references; None: each layer's own.  ``owner`` names the caller in errors.
    """
    total = None
    for name, module in regularized_layers(model, kind):
        if original is None:
            ref = None
        else:
            ref = original[name] if isinstance(original, dict) else original.get_submodule(name).weight
        try:
            term = module.training_regularizer(ref)
        except ValueError as exc:
            raise ValueError(f"{owner}: layer {name!r}: {exc}") from None
        if term is not None:
            total = term if total is None else total + term
    return None if total is None else gamma * total


def method_key(name: str, options: dict[str, Any] | None = None) -> str:
    """``name``, or ``name:key=value,...`` with ``options`` (sorted): how a configured method is named
    on the command line and in plan tables."""
    return name + (":" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k such that the top-k squared singular values hold ``energy`` of the total.

    ``singular_values``: (..., n) sorted descending; leading axes (e.g. groups) take the max.
    """
    s2 = singular_values.double().pow(2)
    s2 = s2.reshape(-1, s2.shape[-1])
    total = s2.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    frac = s2.cumsum(-1) / total
    # Tolerance: energy=1.0 must give the numerical rank, not fail on round-off.
    ks = (frac < energy - 1e-12).sum(-1) + 1
    return int(ks.clamp(max=s2.shape[-1]).max())


def check_target(rank, macs_ratio, energy) -> None:
    """Exactly one of the three targets; ``macs_ratio`` and ``energy`` in (0, 1]."""
    if sum(x is not None for x in (rank, macs_ratio, energy)) != 1:
        raise ValueError("give exactly one of rank=, macs_ratio=, energy=")
    for name, value in (("macs_ratio", macs_ratio), ("energy", energy)):
        if value is not None and not (not isinstance(value, (bool, str)) and _in_unit_interval(value)):
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _in_unit_interval(value) -> bool:
    try:
        return 0 < float(value) <= 1
    except (TypeError, ValueError):
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerTarget:
    """One rank target, validated once: exactly one of ``rank`` (a positive int, or a tuple of them
    for methods with several ranks), ``macs_ratio`` (layer MACs after / before) and ``energy``
    (fraction of squared singular values kept), the last two in (0, 1]."""

    rank: int | tuple[int, ...] | None = None
    macs_ratio: float | None = None
    energy: float | None = None

    def __post_init__(self):
        check_target(self.rank, self.macs_ratio, self.energy)
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(self.rank))
        if self.rank is not None:
            values = self.rank if isinstance(self.rank, tuple) else (self.rank,)
            if not values or not all(_is_int(v) and v >= 1 for v in values):
                raise ValueError(f"rank must be a positive int or a tuple of them, got {self.rank!r}")

    def as_kwargs(self) -> dict[str, Any]:
        """``{"rank": ...}``, ``{"macs_ratio": ...}`` or ``{"energy": ...}``: for :meth:`Method.resolve_ranks`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def default_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """A nominal spatial size for ratio arithmetic when no example input is given."""
    return tuple(max(32, 8 * s) for s in spec.stride)


def _json(value):
    """Tuples (of tuples) as lists: the form a field takes in a JSON recipe."""
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value


@dataclass(frozen=True)
class Method(abc.ABC):
    """A factorization method; a subclass is a frozen dataclass whose fields are its options.

    Subclasses set ``name`` and ``factor_names`` and implement the abstract hooks; the others have
    the documented defaults below.
    """

    #: the registry name, also written to recipes
    name: ClassVar[str] = ""
    #: number of ranks (1 for SVD-like methods, 2 for Tucker-2, ...)
    n_ranks: ClassVar[int] = 1
    #: names of the ranks, for messages and reports
    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    #: accepts nn.Linear (spec.dim == 0)
    supports_linear: ClassVar[bool] = False
    #: spatial dimensionalities supported (1 = Conv1d, 2 = Conv2d, 3 = Conv3d)
    supported_dims: ClassVar[tuple[int, ...]] = (2,)
    #: accepts ``nn.ConvTranspose1d/2d/3d`` (``spec.transposed``); :meth:`check` refuses them otherwise,
    #: also in a subclass that overrides :meth:`check` without calling this one (see ``__init_subclass__``)
    supports_transposed: ClassVar[bool] = False
    #: whether an ``energy`` target is defined (then :meth:`spectra` is implemented)
    supports_energy: ClassVar[bool] = True
    #: :meth:`factorize` fits the layer's responses itself when given ``calibration=`` (data-aware
    #: fitting then hands the inputs over instead of refitting the built module)
    uses_calibration: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def factor_names(self) -> tuple[str, ...]:
        """Names of the factors :meth:`factorize` returns, in the order of the built module's pieces.

        A subclass declares it as a class attribute.  ``"axis*"`` names a family, one factor per
        spatial axis or core (``axis0``, ``axis1``, ...); see :meth:`declares`.
        """

    # ------------------------------------------------------------------ configuration
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options this method takes: its dataclass fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def for_layer(self, spec: ConvSpec) -> "Method":
        """This configuration with its per-layer choices made for ``spec`` (default: itself), e.g.
        ``basis``'s number of splits or ``tt``'s mode shapes.  A built layer records its recipe."""
        return self

    def recipe(self) -> dict[str, Any]:
        """The fields as JSON values (fields at None left out, tuples as lists): what
        :func:`convfactor.save` writes under ``"options"``.  ``registry.get(name, **recipe)``
        gives this configuration back."""
        return {k: _json(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    def changed_options(self) -> dict[str, Any]:
        """The fields that differ from the method's defaults, as JSON values (``{}`` for the default
        configuration): what a plan records per layer, so ``registry.get(name, **changed)`` is this."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
            if value != default:
                out[f.name] = _json(value)
        return out

    def key(self) -> str:
        """A name for this configuration: ``sliced_svd`` or ``sliced_svd:slices=4`` (see
        :func:`convfactor.methods.registry.parse`)."""
        return method_key(self.name, self.changed_options())

    def declares(self, factor: str) -> bool:
        """Whether ``factor`` is one of :attr:`factor_names` (``axis1`` belongs to a family ``axis*``)."""
        for declared in self.factor_names:
            stem = declared[:-1]
            if factor == declared or (declared.endswith("*") and factor.startswith(stem)
                                      and factor[len(stem):].isdigit()):
                return True
        return False

    def factorized(self, spec: ConvSpec, ranks: Ranks, *pieces: nn.Module) -> Factorized:
        """The :class:`Factorized` holding ``pieces``, recording this method's recipe for the layer."""
        return Factorized(*pieces, method=self.name, spec=spec, ranks=ranks,
                          options=self.for_layer(spec).recipe())

    # ------------------------------------------------------------------ applicability
    def __init_subclass__(cls, **kwargs):
        """A subclass's own :meth:`check` is wrapped so that a transposed conv is refused first
        (unless ``supports_transposed``): its math reads the weight as ``(N, C/g, *k)``, and a
        transposed conv's is ``(C, N/g, *k)``, so it would otherwise be silently wrong."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("check")
        if own is not None and not getattr(own, "refuses_transposed", False):
            cls.check = _refusing_transposed(own)

    def check(self, spec: ConvSpec) -> None:
        """Raise :class:`UnsupportedLayer` with a reason if this method cannot handle ``spec``."""
        _check_transposed(self, spec)
        if spec.is_linear:
            if not self.supports_linear:
                raise UnsupportedLayer(f"{self.name}: nn.Linear is not supported (use 'linear_svd' or 'tt')")
        elif spec.dim not in self.supported_dims:
            raise UnsupportedLayer(f"{self.name}: Conv{spec.dim}d is not supported")
        if all(m <= 1 for m in self.full_rank(spec)):
            raise UnsupportedLayer(f"{self.name}: full rank is {self.full_rank(spec)}, nothing to factorize")

    # ------------------------------------------------------------------ rank arithmetic
    @abc.abstractmethod
    def full_rank(self, spec: ConvSpec) -> Ranks:
        """Ranks at which the factorization is exact."""

    def max_rank(self, spec: ConvSpec) -> Ranks:
        """Largest ranks accepted (default: the full rank)."""
        return self.full_rank(spec)

    def expand_rank(self, spec: ConvSpec, rank: int | Sequence[int]) -> Ranks:
        """Normalize a user's ``rank`` to a tuple of ``n_ranks`` ints."""
        if _is_int(rank):
            return (int(rank),) * self.n_ranks
        if isinstance(rank, (tuple, list)) and len(rank) == self.n_ranks and all(_is_int(r) for r in rank):
            return tuple(int(r) for r in rank)
        raise ValueError(f"{self.name}: rank must be an int or a tuple of {self.n_ranks} ints "
                         f"({', '.join(self.rank_names)}), got {rank!r}")

    def validate_ranks(self, spec: ConvSpec, ranks: Ranks) -> Ranks:
        """``ranks`` if each lies in ``[1, max_rank]``, else a ValueError naming the layer."""
        top = self.max_rank(spec)
        for name, r, m in zip(self.rank_names, ranks, top):
            if r < 1 or r > m:
                raise ValueError(f"{self.name}: {name}={r} is out of range [1, {m}] for this layer "
                                 f"(C={spec.in_channels}, N={spec.out_channels}, kernel={spec.kernel_size}, "
                                 f"groups={spec.groups})")
        return tuple(ranks)

    def scaled_ranks(self, spec: ConvSpec, t: float) -> Ranks:
        """The one-parameter family used by ``macs_ratio`` targets: ranks ~ t * full rank."""
        return tuple(max(1, min(m, math.ceil(t * m))) for m in self.full_rank(spec))

    def resolve_ranks(self, spec: ConvSpec, weight: torch.Tensor | None = None, *, rank=None,
                      macs_ratio: float | None = None, energy: float | None = None,
                      input_size: Sequence[int] | None = None) -> Ranks:
        """Exactly one of ``rank``, ``macs_ratio`` (MACs after / before) and ``energy``."""
        check_target(rank, macs_ratio, energy)
        if rank is not None:
            return self.validate_ranks(spec, self.expand_rank(spec, rank))
        if macs_ratio is not None:
            return self.ranks_for_macs(spec, float(macs_ratio), input_size)
        if weight is None:
            raise ValueError("an energy target needs the weight")
        spectra = self.spectra(weight.detach().double(), spec)
        ranks = tuple(energy_rank(s, float(energy)) for s in spectra)
        return tuple(min(r, m) for r, m in zip(ranks, self.max_rank(spec)))

    def ranks_for_macs(self, spec: ConvSpec, ratio: float, input_size: Sequence[int] | None = None) -> Ranks:
        """Largest member of the :meth:`scaled_ranks` family whose MACs are <= ratio x dense."""
        size = default_input_size(spec) if input_size is None else tuple(input_size)
        budget = ratio * spec.dense_macs(size)
        top = max(self.full_rank(spec))
        best = None
        lo, hi = 1, top
        while lo <= hi:  # MACs are monotone in t: bisect over every distinct member of the family
            mid = (lo + hi) // 2
            ranks = self.scaled_ranks(spec, mid / top)
            if self.cost(spec, ranks, size).macs <= budget + 1e-9:
                best, lo = ranks, mid + 1
            else:
                hi = mid - 1
        if best is None:
            smallest = self.cost(spec, self.scaled_ranks(spec, 1 / top), size).macs
            raise ValueError(f"{self.name}: macs_ratio={ratio} is unreachable for this layer; "
                             f"the smallest rank already costs {smallest / max(1, spec.dense_macs(size)):.3f} "
                             f"of the dense MACs")
        return best

    def spectra(self, weight: torch.Tensor, spec: ConvSpec) -> list[torch.Tensor]:
        """Per rank: singular values, shape (groups, n) sorted descending, that ``energy`` uses.

        Default: no spectrum (``supports_energy = False``), so an ``energy`` target is refused.
        """
        raise ValueError(f"{self.name}: an energy target is not defined; give rank= or macs_ratio=")

    # ------------------------------------------------------------------ the four pieces
    @abc.abstractmethod
    def factorize(self, weight: torch.Tensor, spec: ConvSpec, ranks: Ranks, *,
                  calibration: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Pure math. ``weight: (N, C/groups, *kernel)`` (float64); returns named factors.

        ``calibration`` (the layer's inputs) is only given to methods with ``uses_calibration``.
        """

    @abc.abstractmethod
    def reconstruct(self, factors: dict[str, torch.Tensor], spec: ConvSpec) -> torch.Tensor:
        """Dense kernel ``(N, C/groups, *kernel)`` represented by ``factors``."""

    @abc.abstractmethod
    def build(self, spec: ConvSpec, ranks: Ranks, factors: dict[str, torch.Tensor] | None = None, *,
              dtype=None, device=None) -> Factorized:
        """The replacement module; with ``factors=None`` it is left uninitialized (for loading)."""

    @abc.abstractmethod
    def cost(self, spec: ConvSpec, ranks: Ranks, input_size: Sequence[int] = ()) -> Cost:
        """Closed-form params and MACs for a spatial ``input_size`` (one sample)."""

    def factorization_cost(self, spec: ConvSpec, ranks: Ranks) -> float:
        """Estimated flops of :meth:`factorize` (weight-only) for a layer of ``spec`` at ``ranks``: an
        order of magnitude for a "this may take a while" warning, not a promise.

        Default: one thin SVD of each group's kernel matrix ``(N/g, C/g prod(k))``
        (:func:`.linalg.svd_flops`).  Methods whose fit is something else override it.
        """
        return spec.groups * svd_flops(spec.out_per_group, spec.in_per_group * spec.kernel_volume)

    def factors_of(self, module: Factorized) -> dict[str, torch.Tensor]:
        """The factors a built (possibly fine-tuned) ``module`` computes with, for :meth:`reconstruct`.

        Default: the weight of each piece's conv, in order, under :attr:`factor_names`.  Methods whose
        module is not one conv per factor override it.
        """
        convs = [conv_of(piece) for piece in module]
        if len(convs) != len(self.factor_names) or any(n.endswith("*") for n in self.factor_names):
            raise ValueError(f"{self.name}: {len(convs)} pieces do not map to the factors {self.factor_names}")
        return {n: c.weight.detach().double() for n, c in zip(self.factor_names, convs)}

    # ------------------------------------------------------------------ several layers at once
    @property
    def joint(self) -> bool:
        """Whether this configuration fits a rule's layers together (through :meth:`factorize_shared`)."""
        return False

    def factorize_shared(self, layers: dict[str, nn.Module], ranks: dict[str, Ranks]) -> dict[str, Factorized]:
        """Replacements for ``layers`` (name -> layer, each resolved to ``ranks[name]``) fitted
        jointly, e.g. sharing one tensor.  Default: not supported."""
        raise ValueError(f"{self.name}: fitting several layers jointly ('share') is not supported")


def _check_transposed(method: Method, spec: ConvSpec) -> None:
    if spec.transposed and not method.supports_transposed:
        raise UnsupportedLayer(f"{method.name}: ConvTranspose{spec.dim}d is not supported "
                               f"(use 'channel_svd' or 'tucker2')")


def _refusing_transposed(check):
    """``check`` preceded by the transposed-conv refusal of :meth:`Method.check`."""
    @functools.wraps(check)
    def guarded(self, spec: ConvSpec) -> None:
        _check_transposed(self, spec)
        return check(self, spec)
    guarded.refuses_transposed = True
    return guarded


Method.check.refuses_transposed = True


def copy_into(module: nn.Module, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """Copy tensors into a conv/linear (or a ``Sequential(Pad, conv)``) under no_grad."""
    layer = conv_of(module)
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
