"""The facts a criterion works from: per selected layer a :class:`LayerFacts`, and the whole
model's :class:`Totals`, both from one forward pass of the example input."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..compression.api import capture_layer_io, relative_error
from ..compression.surgery import candidate_layers
from ..measure.count import count_params
from ..spec.convspec import ConvSpec, UnsupportedLayer
from ..spec.im2col import patches
from .criteria import below_dense, clip_to_speed_bound, layer_kappa, round_ranks
from .energy import error_estimate, spectral_error_is_exact
from .planfile import LayerPlan

__all__ = ["LayerFacts", "Totals", "collect", "input_gram", "output_error"]

Ranks = tuple[int, ...]

#: methods whose data-aware fit has a closed-form error (:meth:`LayerFacts.response_error`)
RESPONSE_FIT_METHODS = ("channel_svd", "linear_svd")


@dataclass
class LayerFacts:
    """One selected Conv/Linear layer as the planner sees it."""

    name: str
    layer: nn.Module
    spec: ConvSpec
    input_shape: tuple[int, ...]      # full input shape, batch included
    size: tuple[int, ...]             # spatial size (empty for Linear)
    batch: int                        # samples (Conv) or rows (Linear) the layer runs on
    weight: torch.Tensor              # float64 copy of the kernel
    kappa: float                      # condition number of the (N/g, C/g k^2) kernel matrix
    methods: list                     # applicable Method objects, in preference order
    spectra: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # method key -> its spectra
    errors: dict[tuple, float] = field(default_factory=dict)   # (method key, ranks) -> fitted kernel error
    gram: torch.Tensor | None = None  # (groups, C/g k, C/g k) input patch Gram: errors are then output errors
    response: bool = False            # with gram: channel/linear SVD errors are those of the data-aware fit
    response_spectrum: torch.Tensor | None = None   # (groups, N/g) eigenvalues of W G W^T, descending

    @property
    def dense_macs(self) -> int:
        return self.spec.dense_macs(self.size) * self.batch

    def spectra_of(self, method) -> list[torch.Tensor]:
        """``method.spectra`` of this layer, computed once."""
        if method.key() not in self.spectra:
            self.spectra[method.key()] = method.spectra(self.weight, self.spec)
        return self.spectra[method.key()]

    def kernel_error(self, method, ranks: Ranks) -> float:
        """Relative error of ``method`` at ``ranks``: of the kernel (from spectra where exact, else by
        fitting), or with :attr:`gram` set, of the layer's output on its example inputs (with
        :attr:`response`, for channel / linear SVD: the output error of the data-aware fit)."""
        if self.gram is not None and self.response and method.name in RESPONSE_FIT_METHODS:
            return self.response_error(ranks[0])
        if self.gram is None and spectral_error_is_exact(method):
            return error_estimate(self.spectra_of(method), ranks)
        key = (method.key(), tuple(ranks))
        if key not in self.errors:
            approx = method.reconstruct(method.factorize(self.weight, self.spec, tuple(ranks)), self.spec)
            self.errors[key] = (relative_error(approx, self.weight) if self.gram is None
                                else output_error(approx, self.weight, self.gram))
        return self.errors[key]

    def response_error(self, rank: int) -> float:
        """Relative output error of Zhang et al.'s response fit at ``rank`` (TPAMI 2016 sec. 3.1): the
        discarded share of the response spectrum, ``sqrt(sum_{i>r} l_i / sum l_i)``, ``l`` the eigenvalues
        of ``W G W^T`` per group (bias and centring left out)."""
        if self.response_spectrum is None:
            g = self.gram.shape[0]
            w = self.weight.reshape(g, self.weight.shape[0] // g, -1)
            cov = torch.einsum("gni,gij,gmj->gnm", w, self.gram, w)
            self.response_spectrum = torch.linalg.eigvalsh(cov).flip(-1).clamp_min(0)
        total = float(self.response_spectrum.sum())
        tail = float(self.response_spectrum[:, int(rank):].sum())
        return math.sqrt(tail / total) if total > 0 else 0.0

    def bounded(self, method, ranks: Sequence[int], round_to: int | None) -> tuple[Ranks | None, str | None]:
        """Round, then enforce the speed bound -> ``(ranks, note)``; ranks None keeps the layer dense."""
        top = method.max_rank(self.spec)
        ranks = tuple(min(r, m) for r, m in zip(ranks, top))
        if round_to:
            ranks = round_ranks(ranks, round_to, top)
        clipped = clip_to_speed_bound(method, self.spec, ranks, self.size)
        if clipped is None:
            return None, f"{method.name} cannot reduce MACs here (speed bound)"
        note = None if clipped == ranks else f"ranks {list(ranks)} clipped to the speed bound"
        if round_to and clipped != ranks:
            down = round_ranks(clipped, round_to, top, mode="down")
            if below_dense(method, self.spec, down, self.size):
                clipped = down
            else:
                note += f" (no multiple of {round_to} is below it)"
        return clipped, note

    def layer_plan(self, method, ranks: Sequence[int] | None, criterion: str, error: float | None = None,
                   note: str | None = None) -> LayerPlan:
        """The :class:`LayerPlan` for ``method`` at ``ranks`` (None for either keeps the layer dense)."""
        p = LayerPlan(name=self.name, criterion=criterion, input_shape=list(self.input_shape),
                      macs_before=self.dense_macs, params_before=self.spec.dense_params(),
                      kappa=None if math.isinf(self.kappa) else self.kappa, note=note)
        if method is None or ranks is None:
            p.macs_after, p.params_after, p.error = p.macs_before, p.params_before, 0.0
            return p
        cost = method.cost(self.spec, tuple(ranks), self.size)
        p.method, p.ranks = method.name, [int(r) for r in ranks]
        p.options = method.changed_options() or None
        p.macs_after, p.params_after = cost.macs * self.batch, cost.params
        p.error = error if error is not None else self.kernel_error(method, tuple(ranks))
        return p


@dataclass(frozen=True)
class Totals:
    """Whole-model MACs of every Conv/Linear the example input runs (what FlopCounterMode counts for
    these models) and parameters (shared tensors once)."""

    macs: int
    params: int

    def after(self, layers: Iterable[LayerPlan]) -> dict[str, float]:
        """Whole-model figures before and after the planned layers change."""
        layers = list(layers)
        macs = self.macs - sum(p.macs_before - p.macs_after for p in layers)
        params = self.params - sum(p.params_before - p.params_after for p in layers)
        return dict(macs_before=int(self.macs), macs_after=int(macs), macs_ratio=macs / max(1, self.macs),
                    params_before=int(self.params), params_after=int(params),
                    params_ratio=params / max(1, self.params))


def input_gram(x: torch.Tensor, spec: ConvSpec, chunk: int = 8192) -> torch.Tensor:
    """``sum_p patch_p patch_p^T`` per group over every output position of ``x``: ``(g, C/g k, C/g k)``
    float64 (``patches`` is the im2col of :mod:`convfactor.spec.im2col`)."""
    rows = patches(x.detach(), spec)                       # (P, g, C/g k)
    gram = torch.zeros(rows.shape[1], rows.shape[2], rows.shape[2], dtype=torch.float64)
    for i in range(0, rows.shape[0], chunk):
        block = rows[i:i + chunk].double()
        gram += torch.einsum("pgi,pgj->gij", block, block)
    return gram


def output_error(approx: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(approx - weight) * x|| / ||weight * x||`` over the inputs ``gram`` summarizes (bias left
    out: it cancels in the difference): ``tr(D G D^T) / tr(W G W^T)`` per group, ``weight: (N, C/g, *k)``."""
    g = gram.shape[0]
    d = (approx.double() - weight.double()).reshape(g, weight.shape[0] // g, -1)
    w = weight.double().reshape(g, weight.shape[0] // g, -1)
    num = torch.einsum("gni,gij,gnj->", d, gram, d).clamp_min(0)
    den = torch.einsum("gni,gij,gnj->", w, gram, w)
    return float((num / den).sqrt()) if den > 0 else float(num.sqrt())


def collect(model: nn.Module, example_input, methods: list, op_names: Sequence[str] | None = None,
            exclude: Sequence[str] | None = None, on_data: bool = False, response: bool = False
            ) -> tuple[list[LayerFacts], Totals]:
    """Facts of the selected layers the forward pass runs, and the model's totals (one forward pass).
    With ``on_data``, each layer's input Gram (:func:`input_gram`) is kept, so its candidates' errors
    are output errors on the example input's data (not for transposed convs: those keep kernel errors);
    with ``response`` too, channel / linear SVD's are those of the data-aware fit."""
    layers = candidate_layers(model)
    names = [n for n in layers
             if (not op_names or any(fnmatch.fnmatchcase(n, p) for p in op_names))
             and not any(fnmatch.fnmatchcase(n, p) for p in (exclude or []))]
    if not names:
        raise ValueError("no Conv/Linear layer selected" + (f" by {op_names}" if op_names else ""))
    io = capture_layer_io(model, layers, example_input)
    shapes = {n: tuple(x.shape) for n, (x, _) in io.items()}
    specs = {n: ConvSpec.from_module(layers[n]) for n in shapes}
    macs = 0
    for n, shape in shapes.items():
        size, batch = _size_and_batch(specs[n], shape)
        macs += specs[n].dense_macs(size) * batch
    facts = [_facts(n, layers[n], specs[n], shapes[n], methods) for n in names if n in shapes]
    if on_data:
        for f in facts:
            f.gram = None if f.spec.transposed else input_gram(io[f.name][0], f.spec)
            f.response = response
    return facts, Totals(int(macs), count_params(model))


def _size_and_batch(spec: ConvSpec, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Spatial size and batch a layer runs on; a Linear runs on every row of its input."""
    if spec.is_linear:
        return (), math.prod(input_shape) // max(1, input_shape[-1])
    return tuple(input_shape[2:]), input_shape[0]


def _facts(name: str, layer: nn.Module, spec: ConvSpec, input_shape: tuple[int, ...], methods: list) -> LayerFacts:
    size, batch = _size_and_batch(spec, input_shape)
    ok = []
    for m in methods:
        try:
            m.check(spec)
        except UnsupportedLayer:
            continue
        ok.append(m)
    weight = layer.weight.detach().double()
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}.weight contains NaN or Inf values")
    return LayerFacts(name, layer, spec, input_shape, size, batch, weight, layer_kappa(weight, spec), ok)
