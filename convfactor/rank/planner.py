"""``convfactor.plan(model, example_input, target=..., criterion=...) -> Plan``.

Criteria (``criterion=``):

* ``'rank'``      a fixed rank for every layer (``target={'rank': r}``);
* ``'uniform'``   the same per-layer MACs ratio everywhere (``target='macs=40%'`` per layer);
* ``'energy'``    the smallest ranks keeping ``energy`` of each spectrum;
* ``'vbmf'``      EVBMF ranks (Nakajima et al. 2013, as in Kim et al. 2016), weakened by ``weakening``;
* ``'budget'``    a whole-model MACs or params target (``'macs=40%'``, ``'params=3x'``) spread
  greedily over the layers' spectra (Zhang et al. 2016; :mod:`convfactor.rank.budget`);
* ``'latency'``   a measured end-to-end speed-up (``'speedup=3x'``) or an error budget
  (``'error=0.2'``: RMS relative kernel error over the layers): candidates (method, rank) per
  layer, timed on the layer's real input shape in each memory format, chosen by
  :func:`convfactor.rank.latency.choose`, then verified end to end against the original model in
  its own fastest form and tightened until the measured speed-up is within ``band`` of the request.

Every criterion honours the speed bound (a rank whose MACs are not below the dense layer's is
never chosen; such layers stay dense), optional rounding of ranks to a multiple (``round_to=8``)
and optional condition-number marking (``kappa_threshold=``: layers with ``kappa <= threshold``
stay dense, Sedky & Hosmer).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..compression.api import capture_layer_io, relative_error
from ..spec.convspec import ConvSpec, UnsupportedLayer
from ..compression.surgery import candidate_layers
from ..methods import registry
from .budget import allocate, candidates_for, parse_ratio
from .criteria import below_dense, clip_to_speed_bound, round_ranks
from .energy import energy_rank, error_estimate
from .latency import LatencyCache, LayerTimer, Option, choose, compare_models
from .planfile import LayerPlan, Plan
from .vbmf import kernel_vbmf_ranks

__all__ = ["plan", "Plan", "LayerPlan", "parse_target", "CRITERIA", "DEFAULT_RATIOS"]

CRITERIA = ("rank", "uniform", "energy", "vbmf", "budget", "latency")
#: per-layer MACs ratios tried as latency candidates
DEFAULT_RATIOS = (0.08, 0.12, 0.18, 0.25, 0.33, 0.42, 0.5, 0.6, 0.7, 0.8)
#: methods tried by the latency planner when available (CP is opt-in: slow to fit, rarely faster on CPU)
LATENCY_METHODS = ("channel_svd", "spatial_svd", "tucker2", "linear_svd")
#: methods whose spectra give the exact truncation error (Eckart-Young)
_SPECTRAL_EXACT = {"channel_svd", "linear_svd"}


def parse_target(target) -> tuple[str, float] | None:
    """``'macs=40%'`` -> ('macs', 0.4); ``'speedup=3x'`` -> ('speedup', 3.0); also a 1-item dict."""
    if target is None:
        return None
    if isinstance(target, dict):
        if len(target) != 1:
            raise ValueError(f"a target is one key, e.g. {{'speedup': 3}}, got {target!r}")
        (kind, value), = target.items()
    else:
        text = str(target).strip()
        if "=" not in text:
            raise ValueError(f"a target looks like macs=40%, params=25%, speedup=3x or error=0.2, got {target!r}")
        kind, value = (t.strip() for t in text.split("=", 1))
    kind = kind.lower()
    if kind in ("macs", "params"):
        return kind, parse_ratio(value)
    if kind == "speedup":
        try:
            v = float(str(value).lower().rstrip("x"))
        except ValueError:
            raise ValueError(f"speedup must look like 3x, got {value!r}") from None
        if not v >= 1:
            raise ValueError(f"speedup must be >= 1, got {value!r}")
        return kind, v
    if kind in ("error", "energy"):
        v = float(value)
        if not 0 < v <= 1:
            raise ValueError(f"{kind} must be in (0, 1], got {value!r}")
        return kind, v
    if kind == "rank":
        v = int(value)
        if v < 1:
            raise ValueError(f"rank must be >= 1, got {value!r}")
        return kind, v
    raise ValueError(f"unknown target {kind!r} (known: macs, params, speedup, error, energy, rank)")


@dataclass
class _Layer:
    name: str
    layer: nn.Module
    spec: ConvSpec
    input_shape: tuple[int, ...]      # full input shape, batch included
    size: tuple[int, ...]             # spatial size (empty for Linear)
    batch: int
    weight: torch.Tensor              # float64
    kappa: float
    methods: list                     # applicable Method objects, in preference order

    def __post_init__(self):
        self._spectra: dict[str, list[torch.Tensor]] = {}
        self._errors: dict[tuple, float] = {}

    @property
    def dense_macs(self) -> int:
        return self.spec.dense_macs(self.size) * self.batch

    def spectra(self, method) -> list[torch.Tensor]:
        """``method.spectra`` of this layer, computed once."""
        if method.name not in self._spectra:
            self._spectra[method.name] = method.spectra(self.weight, self.spec)
        return self._spectra[method.name]


def _collect(model: nn.Module, example_input, methods: list[str], op_names, exclude) -> list[_Layer]:
    layers = candidate_layers(model)
    names = [n for n in layers
             if (not op_names or any(fnmatch.fnmatchcase(n, p) for p in op_names))
             and not any(fnmatch.fnmatchcase(n, p) for p in (exclude or []))]
    if not names:
        raise ValueError("no Conv/Linear layer selected" + (f" by {op_names}" if op_names else ""))
    io = capture_layer_io(model, names, example_input)
    out = []
    for name in names:
        if name not in io:
            continue            # not run by the forward pass: nothing to gain
        layer = layers[name]
        spec = ConvSpec.from_module(layer)
        x = io[name][0]
        if spec.is_linear:
            size, batch = (), x.numel() // max(1, x.shape[-1])
        else:
            size, batch = tuple(x.shape[2:]), x.shape[0]
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
        from ..compression.inspect import condition_number
        from ..methods.channel_svd import grouped_matrix
        s = torch.linalg.svdvals(grouped_matrix(weight, spec.groups))
        item = _Layer(name, layer, spec, tuple(x.shape), size, batch, weight, condition_number(s), ok)
        for m in ok:
            if m.name in ("channel_svd", "linear_svd"):
                item._spectra[m.name] = [s]      # the same (N/g, C/g k^2) matrix
        out.append(item)
    return out


def _methods(method, methods, criterion) -> list:
    names = methods if methods is not None else ([method] if method else None)
    if isinstance(names, str):
        names = [names]
    if names is None:
        names = [n for n in LATENCY_METHODS if _loadable(n)] if criterion == "latency" else ["channel_svd", "linear_svd"]
    out = []
    for n in names:
        try:
            out.append(registry.get(n))
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    return out


def _loadable(name: str) -> bool:
    """True when the method's module imports cleanly (methods in progress elsewhere may not)."""
    try:
        registry.get(name)
    except Exception:       # noqa: BLE001 - a broken optional method must not break planning
        return False
    return True


def _fill(L: _Layer, method, ranks, criterion: str, error: float | None = None, note: str | None = None) -> LayerPlan:
    p = LayerPlan(name=L.name, criterion=criterion, input_shape=list(L.input_shape), macs_before=L.dense_macs,
                  params_before=L.spec.dense_params(), kappa=None if math.isinf(L.kappa) else L.kappa, note=note)
    if method is None or ranks is None:
        p.macs_after, p.params_after, p.error = p.macs_before, p.params_before, 0.0
        return p
    c = method.cost(L.spec, tuple(ranks), L.size)
    p.method, p.ranks = method.name, [int(r) for r in ranks]
    p.macs_after, p.params_after = c.macs * L.batch, c.params
    p.error = error if error is not None else _error(L, method, tuple(ranks))
    return p


def _error(L: _Layer, method, ranks: tuple[int, ...]) -> float:
    """Relative kernel error of ``method`` at ``ranks``: from spectra where exact, else by fitting."""
    if method.name in _SPECTRAL_EXACT:
        return error_estimate(L.spectra(method), ranks)
    key = (method.name, tuple(ranks))
    if key not in L._errors:
        factors = method.factorize(L.weight, L.spec, tuple(ranks))
        L._errors[key] = relative_error(method.reconstruct(factors, L.spec), L.weight)
    return L._errors[key]


def _bounded(L: _Layer, method, ranks, round_to) -> tuple[tuple[int, ...] | None, str | None]:
    """Round, then enforce the speed bound; None means keep the layer dense."""
    ranks = tuple(min(r, m) for r, m in zip(ranks, method.max_rank(L.spec)))
    if round_to:
        ranks = round_ranks(ranks, round_to, method.max_rank(L.spec))
    clipped = clip_to_speed_bound(method, L.spec, ranks, L.size)
    if clipped is None:
        return None, f"{method.name} cannot reduce MACs here (speed bound)"
    note = None if clipped == ranks else f"ranks {list(ranks)} clipped to the speed bound"
    if round_to and clipped != ranks:
        down = round_ranks(clipped, round_to, method.max_rank(L.spec), mode="down")
        if below_dense(method, L.spec, down, L.size):
            clipped = down
        else:
            note += f" (no multiple of {round_to} is below it)"
    return clipped, note


def _totals(model: nn.Module, example_input) -> tuple[int, int]:
    """Whole-model MACs of every Conv/Linear layer run by ``example_input`` (what FlopCounterMode
    counts for these models) and parameters (shared tensors once)."""
    from ..measure.count import count_params
    layers = candidate_layers(model)
    io = capture_layer_io(model, layers, example_input)
    macs = 0
    for name, (x, _) in io.items():
        spec = ConvSpec.from_module(layers[name])
        if spec.is_linear:
            macs += spec.dense_macs(()) * (x.numel() // max(1, x.shape[-1]))
        else:
            macs += spec.dense_macs(tuple(x.shape[2:])) * x.shape[0]
    return int(macs), count_params(model)


def plan(model: nn.Module, example_input, target=None, criterion: str | None = None, *,
         method: str | None = None, methods: Sequence[str] | None = None, op_names: Sequence[str] | None = None,
         exclude: Sequence[str] | None = None, round_to: int | None = None, energy: float = 0.9,
         weakening: float = 1.0, kappa_threshold: float | None = None, tolerance: float = 0.02,
         threads: int | None = None, timer=None, cache: LatencyCache | str | None = None,
         formats: Sequence[str] = ("contiguous", "channels_last"), ratios: Sequence[float] = DEFAULT_RATIOS,
         repeats: int = 15, min_run_time: float = 0.0, e2e_rounds: int = 5, e2e_repeats: int = 5,
         max_iter: int = 5, band: float = 0.10, min_gain: float = 0.02, model_name: str | None = None,
         progress: bool = False) -> Plan:
    """Plan the compression of ``model`` for ``example_input`` (see the module docstring).

    ``target``: ``'macs=40%'``, ``'params=3x'``, ``'speedup=3x'``, ``'error=0.2'``, ``'energy=0.9'``,
    ``'rank=8'`` or a one-item dict.  ``criterion`` defaults from the target (speedup/error ->
    latency, macs/params -> budget, energy -> energy, rank -> rank; none -> vbmf).
    ``method``/``methods``: which factorizations to use (the latency planner tries several).
    ``threads``/``timer``/``cache``/``repeats``/``min_run_time``: latency measurement; ``timer``
    is ``(module, inputs) -> seconds`` for deterministic tests.  ``model`` is not modified.
    """
    tgt = parse_target(target)
    if criterion is None:
        criterion = {None: "vbmf", "speedup": "latency", "error": "latency", "macs": "budget",
                     "params": "budget", "energy": "energy", "rank": "rank"}[tgt[0] if tgt else None]
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r} (known: {', '.join(CRITERIA)})")
    if round_to is not None and (isinstance(round_to, bool) or int(round_to) < 1):
        raise ValueError(f"round_to must be a positive int (8, 16), got {round_to!r}")
    if kappa_threshold is not None and not kappa_threshold > 0:
        raise ValueError(f"kappa_threshold must be > 0, got {kappa_threshold}")
    needs = {"budget": ("macs", "params"), "latency": ("speedup", "error"), "uniform": ("macs",), "rank": ("rank",)}
    if criterion in needs and (tgt is None or tgt[0] not in needs[criterion]):
        raise ValueError(f"criterion {criterion!r} needs a target of {' or '.join(k + '=...' for k in needs[criterion])}")
    if tgt and tgt[0] == "energy":
        energy = tgt[1]
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if not 0 <= weakening <= 1:
        raise ValueError(f"weakening must be in [0, 1], got {weakening}")
    ms = _methods(method, methods, criterion)
    was_training = model.training
    model.eval()
    try:
        layers = _collect(model, example_input, ms, op_names, exclude)
        x0 = example_input[0] if isinstance(example_input, tuple) else example_input
        result = Plan(criterion=criterion, target=dict([tgt]) if tgt else {}, model=model_name,
                      input_shape=list(x0.shape))
        result.summary["kappa_threshold"] = kappa_threshold
        marked = {L.name: (kappa_threshold is None or L.kappa > kappa_threshold) for L in layers}
        active = [L for L in layers if marked[L.name] and L.methods]
        dense_note = {L.name: ("no method supports this layer" if not L.methods else
                               f"kappa {L.kappa:.3g} <= threshold {kappa_threshold:g}") for L in layers
                      if not (marked[L.name] and L.methods)}
        if criterion == "latency":
            chosen = _plan_latency(model, example_input, active, tgt, result, threads=threads, timer=timer,
                                   cache=cache, formats=formats, ratios=ratios, repeats=repeats,
                                   min_run_time=min_run_time, e2e_rounds=e2e_rounds, e2e_repeats=e2e_repeats,
                                   max_iter=max_iter, band=band, min_gain=min_gain, round_to=round_to,
                                   progress=progress)
        elif criterion == "budget":
            chosen = _plan_budget(model, example_input, active, tgt, result, round_to, tolerance)
        else:
            chosen = {}
            for L in active:
                m = L.methods[0]
                if criterion == "rank":
                    ranks = m.expand_rank(L.spec, int(tgt[1]))
                elif criterion == "uniform":
                    try:
                        ranks = m.ranks_for_macs(L.spec, tgt[1], L.size)
                    except ValueError as exc:
                        chosen[L.name] = _fill(L, None, None, criterion, note=str(exc))
                        continue
                elif criterion == "energy":
                    ranks = tuple(min(energy_rank(sp, energy), top) for sp, top in zip(L.spectra(m), m.max_rank(L.spec)))
                else:
                    ranks = kernel_vbmf_ranks(m, L.spec, L.weight, weakening, spectra=L.spectra(m))
                ranks, note = _bounded(L, m, ranks, round_to)
                chosen[L.name] = _fill(L, m if ranks else None, ranks, criterion, note=note)
            result.summary.update({"energy": energy} if criterion == "energy" else
                                  {"weakening": weakening} if criterion == "vbmf" else {})
        result.layers = [chosen.get(L.name) or _fill(L, None, None, criterion, note=dense_note.get(L.name))
                         for L in layers]
        if criterion != "latency":
            _summarize_costs(model, example_input, result)
        if round_to:
            result.summary["round_to"] = int(round_to)
        return result
    finally:
        model.train(was_training)


def _summarize_costs(model, example_input, result: Plan) -> None:
    total_macs, total_params = _totals(model, example_input)
    macs = total_macs - sum(p.macs_before - p.macs_after for p in result.layers)
    params = total_params - sum(p.params_before - p.params_after for p in result.layers)
    result.summary.update(macs_before=int(total_macs), macs_after=int(macs), macs_ratio=macs / max(1, total_macs),
                          params_before=int(total_params), params_after=int(params),
                          params_ratio=params / max(1, total_params))


# ---------------------------------------------------------------------------------------- budget
def _plan_budget(model, example_input, active: list[_Layer], tgt, result: Plan, round_to, tolerance) -> dict:
    metric, ratio = tgt
    total_macs, total_params = _totals(model, example_input)
    total = total_macs if metric == "macs" else total_params
    cands = [candidates_for(L.name, L.methods[0], L.spec, L.weight, L.size, metric, L.batch, round_to,
                            spectra=L.spectra(L.methods[0])) for L in active]
    fixed = total - sum(c.cost[0] for c in cands)
    budget = ratio * total - fixed
    achieved, ok = allocate(cands, budget, tolerance=tolerance * ratio * total / 4,
                            overshoot=0.9 * tolerance * ratio * total)
    achieved_ratio = (fixed + achieved) / max(1, total)
    within = abs(achieved_ratio - ratio) <= tolerance * ratio
    result.summary.update(requested_ratio=ratio, metric=metric, achieved_ratio=achieved_ratio,
                          reachable=bool(ok and within))
    if not ok:
        result.summary["message"] = (f"{metric}={ratio:.3g} is unreachable with these layers/methods; the smallest "
                                     f"plan keeps {achieved_ratio:.3g} of the model's {metric}")
    elif not within:
        result.summary["message"] = f"landed at {achieved_ratio:.4g}, outside +-{tolerance:.0%} of {ratio:.4g}"
    chosen = {}
    for L, c in zip(active, cands):
        ranks = c.states[c.current]
        chosen[L.name] = _fill(L, L.methods[0] if ranks else None, ranks, "budget",
                               error=c.error[c.current] if ranks else None)
    return chosen


# ---------------------------------------------------------------------------------------- latency
def _signature(spec: ConvSpec, method: str | None = None, ranks=None) -> str:
    import json
    return json.dumps({"spec": spec.to_dict(), "method": method, "ranks": list(ranks) if ranks else None},
                      sort_keys=True)


def _options_for(L: _Layer, fmt: str, lt: LayerTimer, ratios, round_to, min_gain, errors: dict) -> list[Option]:
    """The dense layer and every candidate that beats it, timed together on the layer's input shape."""
    dtype = L.layer.weight.dtype
    items = [(L.layer, _signature(L.spec))]
    cands = []
    seen = set()
    for m in L.methods:
        for ratio in ratios:
            try:
                ranks = m.ranks_for_macs(L.spec, float(ratio), L.size)
            except ValueError:
                continue
            ranks, _ = _bounded(L, m, ranks, round_to)
            if ranks is None or (m.name, ranks) in seen:
                continue
            seen.add((m.name, ranks))
            module = m.build(L.spec, ranks, None, dtype=dtype, device=L.layer.weight.device)
            items.append((module, _signature(L.spec, m.name, ranks)))
            cands.append((m, ranks))
    times = lt.time_group(items, L.input_shape, dtype=dtype, memory_format=fmt)
    dense_ms = times[0]
    opts = [Option(None, None, dense_ms, 0.0, L.dense_macs, L.spec.dense_params())]
    for (m, ranks), t in zip(cands, times[1:]):
        if t > dense_ms * (1 - min_gain):
            continue            # not faster than the dense layer: never a candidate
        if (m.name, ranks) not in errors:
            errors[(m.name, ranks)] = _error(L, m, ranks)
        c = m.cost(L.spec, ranks, L.size)
        opts.append(Option(m.name, ranks, t, errors[(m.name, ranks)], c.macs * L.batch, c.params))
    return opts


def _next_aim(history: list[dict], value: float, speed: float, measured: float) -> float:
    """The next per-layer-model speed-up to aim at, so that the *measured* one meets ``value``.

    The tries so far map predicted (per-layer model) to measured (end to end) speed-ups.  Between
    two tries that bracket the request, interpolate in log space (secant); otherwise scale the last
    prediction by the factor the measurement missed by.  Never aims at 1x or below (that is the
    dense model, which needs no try).
    """
    floor = 1.0 + 0.05 * (value - 1.0)
    pts = [h for h in history if h["predicted_speedup"] and h["measured_speedup"] > 0]
    below = [h for h in pts if h["measured_speedup"] < value]
    above = [h for h in pts if h["measured_speedup"] > value]
    if below and above:
        lo = max(below, key=lambda h: h["measured_speedup"])
        hi = min(above, key=lambda h: h["measured_speedup"])
        a0, a1 = math.log(lo["predicted_speedup"]), math.log(hi["predicted_speedup"])
        m0, m1 = math.log(lo["measured_speedup"]), math.log(hi["measured_speedup"])
        if m1 > m0 and a1 != a0:
            return max(floor, math.exp(a0 + (math.log(value) - m0) * (a1 - a0) / (m1 - m0)))
    last = history[-1]["predicted_speedup"] if history and history[-1]["predicted_speedup"] else speed
    return max(floor, last * value / max(measured, 1e-9))


def _plan_latency(model, example_input, active: list[_Layer], tgt, result: Plan, *, threads, timer, cache, formats,
                  ratios, repeats, min_run_time, e2e_rounds, e2e_repeats, max_iter, band, min_gain, round_to,
                  progress) -> dict:
    from ..measure.latency import environment
    if isinstance(cache, (str, bytes)) or hasattr(cache, "__fspath__"):
        cache = LatencyCache(cache)
    cache = cache if cache is not None else LatencyCache()
    formats = list(formats)
    x0 = example_input[0] if isinstance(example_input, tuple) else example_input
    if x0.dim() not in (4, 5):
        formats = ["contiguous"]
    bad = [f for f in formats if f not in ("contiguous", "channels_last", "channels_last_3d")]
    if bad or not formats:
        raise ValueError(f"formats must be among contiguous, channels_last, got {list(formats)}")
    lt = LayerTimer(threads=threads, timer=timer, repeats=repeats, min_run_time=min_run_time, cache=cache)
    e2e = dict(threads=threads, timer=timer, rounds=e2e_rounds, repeats=e2e_repeats, min_run_time=min_run_time)

    # 1. the original model in each memory format; the reference is the fastest.
    base = compare_models({f: (model, f) for f in formats}, example_input, **e2e)
    ref_fmt = min(base, key=base.get)
    # 2. per format, per layer: the dense time and the candidates that beat it.
    per_fmt: dict[str, list[list[Option]]] = {f: [] for f in formats}
    errors: dict = {}
    iterator = [(f, L) for f in formats for L in active]
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="timing candidates", unit="layer")
    for f, L in iterator:
        per_fmt[f].append(_options_for(L, f, lt, ratios, round_to, min_gain, errors.setdefault(L.name, {})))
    # What the planner cannot change: the model's time minus its dense layers' times.  Layer timings
    # taken in isolation can add up to more than the model (a busy machine, cold caches); then they
    # are scaled down together (ratios kept) so the layers take at most 97% of the model's time.
    other, scales = {}, {}
    for f in formats:
        dense_sum = sum(o[0].ms for o in per_fmt[f])
        scale = min(1.0, 0.97 * base[f] / dense_sum) if dense_sum > 0 else 1.0
        if scale < 1.0:
            per_fmt[f] = [[Option(o.method, o.ranks, o.ms * scale, o.error, o.macs, o.params) for o in opts]
                          for opts in per_fmt[f]]
        other[f] = max(0.0, base[f] - dense_sum * scale)
        scales[f] = scale
    cache.save()

    kind, value = tgt
    n = max(1, len(active))

    def solve(speed: float | None):
        """Best (format, choice, feasible, predicted ms, sum err^2) for a speed-up or the error budget."""
        best = None
        for f in formats:
            opts = per_fmt[f]
            if kind == "speedup":
                choice, ok = choose(opts, time_budget=base[ref_fmt] / speed - other[f])
            else:
                choice, ok = choose(opts, error_budget=value ** 2 * n)
            pred = other[f] + sum(o[i].ms for o, i in zip(opts, choice))
            err = sum(o[i].error ** 2 for o, i in zip(opts, choice))
            key = ((0 if ok else 1), err if kind == "speedup" and ok else pred, pred)
            if best is None or key < best[0]:
                best = (key, f, choice, ok, pred, err)
        return best[1:]

    def to_plan(f, choice) -> dict:
        chosen = {}
        for L, opts, i in zip(active, per_fmt[f], choice):
            o = opts[i]
            m = registry.get(o.method) if o.method else None
            p = _fill(L, m, o.ranks, "latency", error=o.error if m else None,
                      note=None if m or len(opts) > 1 else "no candidate is faster than the dense layer")
            p.dense_ms, p.factorized_ms = opts[0].ms, (o.ms if m else None)
            chosen[L.name] = p
        return chosen

    history, tried, seen = [], [], set()
    speed = value if kind == "speedup" else None
    for it in range(max(1, max_iter)):
        f, choice, ok, pred, err = solve(speed)
        if (f, tuple(choice)) in seen:
            break               # the aim moved but the plan did not: measuring it again tells nothing new
        seen.add((f, tuple(choice)))
        chosen = to_plan(f, choice)
        trial = Plan(layers=list(chosen.values()))
        if not trial.compressed:
            measured, t_plan, t_ref = 1.0, base[ref_fmt], base[ref_fmt]
        else:
            compressed, _ = trial.apply(model)
            t = compare_models({"ref": (model, ref_fmt), "plan": (compressed, f)}, example_input, **e2e)
            t_ref, t_plan = t["ref"], t["plan"]
            measured = t_ref / t_plan
        rms = math.sqrt(err / n)
        history.append({"iteration": it, "memory_format": f, "aimed_speedup": speed, "predicted_speedup":
                        base[ref_fmt] / pred, "measured_speedup": measured, "rms_kernel_error": rms,
                        "feasible": ok, "reference_ms": t_ref, "plan_ms": t_plan})
        tried.append((chosen, f, measured, rms, pred, t_ref, t_plan))
        if kind != "speedup":
            break
        lo, hi = value * (1 - band), value * (1 + band)
        if lo <= measured <= hi:
            break
        if not ok and measured < lo:
            # even the fastest candidates everywhere miss: nothing tighter to try
            break
        speed = _next_aim(history, value, speed, measured)

    # 3. pick: within the band with the least error; else the fastest; never slower than the original.
    if kind == "speedup":
        lo, hi = value * (1 - band), value * (1 + band)
        inside = [t for t in tried if lo <= t[2] <= hi]
        above = [t for t in tried if t[2] > hi]
        if inside:
            pick = min(inside, key=lambda t: t[3])
        elif above:      # faster than asked: the least lossy of those
            pick = min(above, key=lambda t: t[3])
        else:
            pick = max(tried, key=lambda t: t[2])
        reachable = bool(inside)
    else:
        pick, reachable = tried[-1], True
    chosen, f, measured, rms, pred, t_ref, t_plan = pick
    message = None
    if measured < 1.0:
        chosen = {L.name: _fill(L, None, None, "latency", note="dense: the measured plan was slower") for L in active}
        message = (f"every plan measured was slower than the original in its fastest form (best {measured:.3f}x); "
                   "every layer stays dense")
        f, measured, t_plan = ref_fmt, 1.0, t_ref
        reachable = kind != "speedup" or value * (1 - band) <= 1.0
    elif kind == "speedup" and not reachable and measured > value * (1 + band):
        message = (f"no try landed inside the band {value * (1 - band):.3g}-{value * (1 + band):.3g}x; "
                   f"the least lossy plan above it measures {measured:.3f}x")
    elif kind == "speedup" and not reachable:
        message = (f"speedup={value:g}x is unreachable here: the best plan found measures {measured:.3f}x "
                   f"(target band {value * (1 - band):.3g}-{value * (1 + band):.3g}x)")
    result.memory_format = f
    result.environment = {**environment(threads), "dtype": str(x0.dtype), "input_shape": list(x0.shape),
                          "timer": "injected" if timer is not None else "torch.utils.benchmark"}
    result.summary.update(
        requested_speedup=value if kind == "speedup" else None, requested_error=value if kind == "error" else None,
        measured_speedup=measured, reference_format=ref_fmt, reference_ms=t_ref, plan_ms=t_plan,
        predicted_speedup=base[ref_fmt] / pred if pred else None, rms_kernel_error=rms, reachable=reachable,
        original_ms={k: v for k, v in base.items()}, layer_time_scale=scales, history=history)
    if message:
        result.summary["message"] = message
    total_macs, total_params = _totals(model, example_input)
    layers = list(chosen.values())
    result.summary["macs_ratio"] = (total_macs - sum(p.macs_before - p.macs_after for p in layers)) / max(1, total_macs)
    result.summary["params_ratio"] = (total_params - sum(p.params_before - p.params_after for p in layers)) / max(1, total_params)
    return chosen
