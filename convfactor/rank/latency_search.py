"""The latency criterion: a measured end-to-end speed-up (``speedup=3x``) or an error budget
(``error=0.2``: RMS relative kernel error over the layers).

1. The original model is timed in each memory format; the fastest is the reference.
2. Per format and layer, the dense layer and its candidates (method, rank) are timed on the layer's
   real input shape (:class:`TimingTable`); candidates not faster than dense are dropped.
3. :func:`convfactor.rank.latency.choose` picks one option per layer for an aimed speed-up; the
   plan is measured end to end (a :class:`Trial`), and the aim is moved (:func:`_next_aim`) until a
   try lands in the :class:`~convfactor.rank.target.SpeedupBand`.
4. The least lossy try inside the band wins; a plan slower than the original is never returned.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from ..measure.backends import fp32_of, get_backend
from ..measure.compare import compare_speed
from ..measure.latency import environment
from ..methods import registry
from ..spec.convspec import ConvSpec
from ..utils import as_inputs
from .criterion import Criterion, PlanContext
from .facts import LayerFacts
from .latency import LatencyConfig, LayerTimer, Option, choose
from .planfile import LayerPlan, Plan
from .target import SpeedupBand, Target

__all__ = ["LatencyCriterion", "Trial", "TimingTable", "Choice"]


@dataclass(frozen=True)
class Choice:
    """One option index per layer, in one memory format, with the per-layer model's prediction."""

    memory_format: str
    indices: tuple[int, ...]
    feasible: bool
    predicted_ms: float
    squared_error: float          # sum over layers of the squared relative kernel error


@dataclass
class Trial:
    """One try of the latency loop: a choice measured end to end against the original."""

    iteration: int
    memory_format: str
    aimed_speedup: float | None
    predicted_speedup: float
    measured_speedup: float
    rms_kernel_error: float
    feasible: bool
    reference_ms: float
    plan_ms: float
    predicted_ms: float = field(repr=False)
    layers: dict[str, LayerPlan] = field(repr=False, default_factory=dict)
    interval: tuple[float, float] | None = None     # 95% interval of ``measured_speedup``
    noise: list[str] = field(default_factory=list)  # why the check is not trustworthy, if it is not

    def record(self) -> dict:
        """The plan file's history entry."""
        out = asdict(self)
        del out["layers"], out["predicted_ms"]
        return out

    def lands_in(self, band: SpeedupBand) -> bool:
        """The median is inside ``band`` and the interval's lower edge clears the band's floor (the request
        for an at-least band): accepted on the confident figure, not on one noisy median."""
        low = self.interval[0] if self.interval else self.measured_speedup
        return self.measured_speedup in band and low >= min(band.low, band.request)

    def line(self) -> str:
        ci = f" (95% {self.interval[0]:.2f}-{self.interval[1]:.2f}x)" if self.interval else ""
        aim = f"aimed {self.aimed_speedup:.2f}x, " if self.aimed_speedup else ""
        return (f"check {self.iteration + 1}: {aim}predicted {self.predicted_speedup:.2f}x, measured "
                f"{self.measured_speedup:.2f}x{ci} in {self.memory_format}" + (" [noisy]" if self.noise else ""))


@dataclass
class TimingTable:
    """Per memory format and layer the timed options (index 0 dense), and the original model's times."""

    layers: list[LayerFacts]
    options: dict[str, list[list[Option]]]
    original_ms: dict[str, float]          # the original model in each format
    other_ms: dict[str, float]             # what no layer choice changes: the model minus its dense layers
    scales: dict[str, float]               # factor the layer timings were scaled by to fit the model's time
    original_cached: bool = False          # ``original_ms`` came from the timing cache
    skipped_formats: dict[str, str] = field(default_factory=dict)   # format -> why it has no layer table

    @property
    def reference_format(self) -> str:
        return min(self.original_ms, key=self.original_ms.get)

    @property
    def reference_ms(self) -> float:
        return self.original_ms[self.reference_format]

    def solve(self, target: Target, speed: float | None) -> Choice:
        """The best choice over the formats for an aimed ``speed`` (or for the error budget)."""
        best = None
        for fmt, opts in self.options.items():
            if target.kind == "speedup":
                indices, ok = choose(opts, time_budget=self.reference_ms / speed - self.other_ms[fmt])
            else:
                indices, ok = choose(opts, error_budget=target.value ** 2 * max(1, len(self.layers)))
            pred = self.other_ms[fmt] + sum(o[i].ms for o, i in zip(opts, indices))
            err = sum(o[i].error ** 2 for o, i in zip(opts, indices))
            key = ((0 if ok else 1), err if target.kind == "speedup" and ok else pred, pred)
            if best is None or key < best[0]:
                best = (key, Choice(fmt, tuple(indices), ok, pred, err))
        return best[1]

    def digest(self) -> str:
        """What the table predicts from (every option's time and error, the original's times): equal
        digests predict alike, so earlier tries of the same table can aim a new plan."""
        opts = {f: [[(o.method, o.options, o.ranks, round(o.ms, 6), round(o.error, 9)) for o in layer]
                    for layer in table]
                for f, table in self.options.items()}
        text = json.dumps([opts, {f: round(v, 6) for f, v in self.original_ms.items()}], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def layer_plans(self, choice: Choice) -> dict[str, LayerPlan]:
        chosen = {}
        for facts, opts, i in zip(self.layers, self.options[choice.memory_format], choice.indices):
            o = opts[i]
            method = registry.get(o.method, **(o.options or {})) if o.method else None
            p = facts.layer_plan(method, o.ranks, LatencyCriterion.name, error=o.error if method else None,
                                 note=None if method or len(opts) > 1 else "no candidate is faster than the dense layer")
            p.dense_ms, p.factorized_ms = opts[0].ms, (o.ms if method else None)
            chosen[facts.name] = p
        return chosen


def _signature(spec: ConvSpec, method: str | None = None, ranks=None) -> str:
    """What a layer timing depends on: the layer and the candidate (``method``: its key, options included)."""
    return json.dumps({"spec": spec.to_dict(), "method": method, "ranks": list(ranks) if ranks else None},
                      sort_keys=True)


def _candidates(facts: LayerFacts, ratios: Sequence[float], round_to: int | None) -> list[tuple]:
    """Distinct ``(method, ranks)`` per method and MACs ratio, rounded and held to the speed bound."""
    out, seen = [], set()
    for m in facts.methods:
        for ratio in ratios:
            try:
                ranks = m.ranks_for_macs(facts.spec, float(ratio), facts.size)
            except ValueError:
                continue
            ranks, _ = facts.bounded(m, ranks, round_to)
            if ranks is not None and (m.key(), ranks) not in seen:
                seen.add((m.key(), ranks))
                out.append((m, ranks))
    return out


def _options_for(facts: LayerFacts, fmt: str, timer: LayerTimer, cfg: LatencyConfig,
                 round_to: int | None) -> list[Option]:
    """The dense layer and every candidate that beats it, timed together on the layer's input shape."""
    weight = facts.layer.weight
    cands = _candidates(facts, cfg.ratios, round_to)
    items = [(facts.layer, _signature(facts.spec))]
    items += [(m.build(facts.spec, ranks, None, dtype=weight.dtype, device=weight.device),
               _signature(facts.spec, m.key(), ranks)) for m, ranks in cands]
    times = timer.time_group(items, facts.input_shape, dtype=weight.dtype, memory_format=fmt)
    dense_ms = times[0]
    opts = [Option(None, None, dense_ms, 0.0, facts.dense_macs, facts.spec.dense_params())]
    for (m, ranks), t in zip(cands, times[1:]):
        if t > dense_ms * (1 - cfg.min_gain):
            continue            # not faster than the dense layer: never a candidate
        c = m.cost(facts.spec, ranks, facts.size)
        opts.append(Option(m.name, ranks, t, facts.kernel_error(m, ranks), c.macs * facts.batch, c.params,
                           m.changed_options() or None))
    return opts


def _fit_to_model(options: list[list[Option]], model_ms: float) -> tuple[list[list[Option]], float, float]:
    """``(options, other ms, scale)``: layer timings taken in isolation can add up to more than the
    model (a busy machine, cold caches); then they are scaled down together (ratios kept) so the
    layers take at most 97% of the model's time.  ``other``: the model's time minus its dense layers'."""
    dense_sum = sum(o[0].ms for o in options)
    scale = min(1.0, 0.97 * model_ms / dense_sum) if dense_sum > 0 else 1.0
    if scale < 1.0:
        options = [[replace(o, ms=o.ms * scale) for o in opts] for opts in options]
    return options, max(0.0, model_ms - dense_sum * scale), scale


def time_table(model: nn.Module, example_input, layers: list[LayerFacts], formats: list[str], cfg: LatencyConfig,
               timer: LayerTimer, round_to: int | None, progress: bool = False) -> TimingTable:
    """Steps 1 and 2: the original in each format (cached by its structure), then each layer's
    options in each format."""
    original, cached = cfg.original_times(model, example_input, formats, timer.cache)
    formats = cfg.searched_formats(original)
    skipped = {f: (f"the original is {t / original[formats[0]] - 1:.0%} slower in {f} than in {formats[0]}; "
                   f"no layer table (format_slack={cfg.format_slack:g})")
               for f, t in original.items() if f not in formats}
    formats.sort(key=original.get)
    work = [(f, facts) for f in formats for facts in layers]
    if progress:
        from tqdm.auto import tqdm
        work = tqdm(work, desc="timing candidates", unit="layer")
    raw: dict[str, list[list[Option]]] = {f: [] for f in formats}
    for f, facts in work:
        raw[f].append(_options_for(facts, f, timer, cfg, round_to))
    options, other, scales = {}, {}, {}
    for f in formats:
        options[f], other[f], scales[f] = _fit_to_model(raw[f], original[f])
    return TimingTable(list(layers), options, original, other, scales, original_cached=cached,
                       skipped_formats=skipped)


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


def _measure(table: TimingTable, model: nn.Module, example_input, choice: Choice, cfg: LatencyConfig,
             iteration: int, aim: float | None) -> Trial:
    """Apply ``choice`` to a copy of the model and time it against the original in its fastest form."""
    layers = table.layer_plans(choice)
    trial = Plan(layers=list(layers.values()))
    t_ref = t_plan = table.reference_ms
    interval, noise = (1.0, 1.0), []
    if trial.compressed:
        compressed, _ = trial.apply(model)
        check = cfg.verify(model, compressed, example_input, (table.reference_format, choice.memory_format))
        t_ref = check.original[check.original_best]["median_ms"]
        t_plan = check.compressed[check.compressed_best]["median_ms"]
        interval, noise = check.interval, check.noise
    return Trial(iteration=iteration, memory_format=choice.memory_format, aimed_speedup=aim,
                 predicted_speedup=table.reference_ms / choice.predicted_ms, measured_speedup=t_ref / t_plan,
                 rms_kernel_error=math.sqrt(choice.squared_error / max(1, len(table.layers))),
                 feasible=choice.feasible, reference_ms=t_ref, plan_ms=t_plan, predicted_ms=choice.predicted_ms,
                 layers=layers, interval=interval, noise=noise)


def search(table: TimingTable, model: nn.Module, example_input, target: Target, band: SpeedupBand | None,
           cfg: LatencyConfig, log=None, prior: Sequence[Sequence[float]] = ()) -> list[Trial]:
    """Step 3: measured tries, each aimed from the ones before, until one lands in ``band`` (judged by
    :meth:`Trial.lands_in`).  The aim never exceeds ``cfg.max_aim_factor`` x the first aim, and a noisy
    check (its interval too wide even after the extra rounds) ends the search instead of re-aiming: a
    busy machine's timing never buys a deeper cut than the request needs.  ``prior``: ``(predicted,
    measured)`` speed-ups of earlier plans from the same table; they aim the tries (a warm plan's first
    try usually lands), but every try is still measured."""
    trials: list[Trial] = []
    seen = set()
    earlier = [dict(predicted_speedup=p, measured_speedup=m) for p, m in prior]
    aim = band.aim if band else None
    if band and earlier:
        aim = min(_next_aim(earlier, band.aim, aim, earlier[-1]["measured_speedup"]), cfg.max_aim_factor * band.aim)
    for iteration in range(cfg.max_iter):
        choice = table.solve(target, aim)
        if (choice.memory_format, choice.indices) in seen:
            break               # the aim moved but the plan did not: measuring it again tells nothing new
        seen.add((choice.memory_format, choice.indices))
        trial = _measure(table, model, example_input, choice, cfg, iteration, aim)
        trials.append(trial)
        if log:
            log(trial.line())
        if band is None or trial.lands_in(band):
            break
        if not choice.feasible and trial.measured_speedup < band.low:
            break               # even the fastest candidates everywhere miss: nothing tighter to try
        if trial.noise:
            break               # noisy evidence never moves the aim: no extra MACs cut on a busy machine's word
        aim = min(_next_aim(earlier + [t.record() for t in trials], band.aim, aim, trial.measured_speedup),
                  cfg.max_aim_factor * band.aim)
    return trials


def pick(trials: list[Trial], band: SpeedupBand | None) -> tuple[Trial, bool]:
    """Step 4: ``(trial, reachable)``: inside the band with the least error; else the least lossy
    above it; else the fastest.  Without a band (an error budget) the last try."""
    if band is None:
        return trials[-1], True
    inside = [t for t in trials if t.lands_in(band)]
    above = [t for t in trials if t.measured_speedup > band.high]
    if inside:
        return min(inside, key=lambda t: t.rms_kernel_error), True
    if above:      # faster than asked: the least lossy of those
        return min(above, key=lambda t: t.rms_kernel_error), False
    return max(trials, key=lambda t: t.measured_speedup), False


def _logger(progress: bool):
    """Where the end-to-end checks report as they go: stderr when ``progress``, else nowhere."""
    if not progress:
        return None
    return lambda line: print(f"  {line}", file=sys.stderr, flush=True)


def precision_credit(model: nn.Module, example, cfg: LatencyConfig, target: Target) -> dict | None:
    """For a speed-up request on a back-end at a lower precision (``openvino:precision=bf16``): the dense
    model at that precision timed against the dense fp32 model on the same runtime, interleaved.  It is
    the first candidate (an easy request is met at the least damage: no factorization); otherwise low
    rank is asked only for the rest of the request (against the credit's lower 95% edge, so the product
    is confirmed; at least 1x).  None for a back-end at its default precision."""
    base = fp32_of(cfg.backend) if isinstance(cfg.backend, str) else None
    if base is None or target.kind != "speedup":
        return None
    with torch.no_grad():
        res = compare_speed(model, model, example, threads=cfg.threads, backend=cfg.backend, baseline=base,
                            repeats=cfg.e2e_rounds * cfg.e2e_repeats, rounds=cfg.e2e_rounds,
                            max_rounds=cfg.e2e_max_rounds, timer=cfg.timer, count_macs=False)
    return dict(backend=cfg.backend, baseline=base, speedup=res.speedup, interval=tuple(res.interval),
                meets_request=res.confident_speedup >= target.value,
                low_rank_request=max(1.0, target.value / res.confident_speedup),
                noise=list(res.noise))


def _dense_at_precision(layers: list[LayerFacts], context: PlanContext, credit: dict) -> dict[str, LayerPlan]:
    """Every layer dense: the precision alone meets the request (the summary says by how much)."""
    x0 = as_inputs(context.example_input)[0]
    context.plan.environment = {**environment(context.latency.threads), "dtype": str(x0.dtype),
                                "input_shape": list(x0.shape), "backend": context.latency.backend}
    context.plan.summary.update(requested_speedup=context.target.value, measured_speedup=credit["speedup"],
                                reachable=True, message=None)
    note = f"dense: {credit['backend']} alone measures {credit['speedup']:.2f}x against {credit['baseline']}"
    return {f.name: f.layer_plan(None, None, LatencyCriterion.name, note=note) for f in layers}


def _dense_fallback(layers: list[LayerFacts]) -> dict[str, LayerPlan]:
    return {f.name: f.layer_plan(None, None, LatencyCriterion.name, note="dense: the measured plan was slower")
            for f in layers}


def _outcome(trial: Trial, reachable: bool, band: SpeedupBand | None, table: TimingTable) -> dict:
    """Summary figures of the picked try; a try slower than the original becomes the dense model."""
    out = dict(memory_format=trial.memory_format, measured_speedup=trial.measured_speedup,
               plan_ms=trial.plan_ms, reachable=reachable, message=None)
    if trial.measured_speedup < 1.0:
        out.update(memory_format=table.reference_format, measured_speedup=1.0, plan_ms=trial.reference_ms,
                   reachable=band is None or band.low <= 1.0,
                   message=(f"every plan measured was slower than the original in its fastest form "
                            f"(best {trial.measured_speedup:.3f}x); every layer stays dense"))
    elif band is not None and not reachable and trial.noise:
        out["message"] = (f"speedup={band.request:g}x could not be confirmed on this busy machine: the plan measured "
                          f"{trial.measured_speedup:.3f}x ({'; '.join(trial.noise)}); re-plan on a quiet machine")
    elif band is not None and not reachable and trial.measured_speedup > band.high:
        out["message"] = (f"no try landed inside the band {band.low:.3g}-{band.high:.3g}x; "
                          f"the least lossy plan above it measures {trial.measured_speedup:.3f}x")
    elif band is not None and not reachable:
        out["message"] = (f"speedup={band.request:g}x is unreachable here: the best plan found measures "
                          f"{trial.measured_speedup:.3f}x (target band {band.low:.3g}-{band.high:.3g}x)")
    return out


class LatencyCriterion(Criterion):
    """A measured end-to-end speed-up, or an RMS kernel error budget at the least measured time."""

    name = "latency"
    needs = ("speedup", "error")
    #: tried when available (CP is opt-in: slow to fit, rarely faster on CPU)
    default_methods = ("channel_svd", "spatial_svd", "tucker2", "linear_svd")

    def __call__(self, layers: Sequence[LayerFacts], context: PlanContext) -> dict[str, LayerPlan]:
        cfg, target, layers = context.latency, context.target, list(layers)
        example = context.example_input
        x0 = as_inputs(example)[0]
        credit = precision_credit(context.model, example, cfg, target)
        if credit is not None:
            context.plan.summary.update(precision_credit=credit)
            if credit["meets_request"]:
                return _dense_at_precision(layers, context, credit)
            target = Target("speedup", credit["low_rank_request"])
        cache = cfg.open_cache()
        round_to = context.config.round_to or get_backend(cfg.backend).channel_multiple()
        table = time_table(context.model, example, layers, cfg.formats_for(x0), cfg, cfg.layer_timer(cache),
                           round_to, context.progress)
        band = cfg.speedup_band(target.value) if target.kind == "speedup" else None
        digest = table.digest()
        prior = cache.trials.get(digest, [])
        trials = search(table, context.model, example, target, band, cfg, log=_logger(context.progress), prior=prior)
        busy = any(t.noise for t in trials)
        if not busy:            # timings taken on a busy machine would mislead every later plan: not kept
            cache.add_trials(digest, [(t.predicted_speedup, t.measured_speedup) for t in trials
                                              if t.plan_ms != t.reference_ms])
            cache.save()
        trial, reachable = pick(trials, band)
        outcome = _outcome(trial, reachable, band, table)
        result = context.plan
        result.memory_format = outcome.pop("memory_format")
        result.environment = {**environment(cfg.threads), "dtype": str(x0.dtype), "input_shape": list(x0.shape),
                              "timer": "injected" if cfg.timer is not None else "torch.utils.benchmark",
                              "backend": cfg.backend, "layer_backend": cfg.layer_backend}
        result.summary.update(
            **outcome, requested_speedup=context.target.value if band else None, aimed_speedup=band.aim if band else None,
            speedup_band=(band.low, band.high) if band else None,
            requested_error=target.value if target.kind == "error" else None,
            reference_format=table.reference_format, reference_ms=trial.reference_ms,
            predicted_speedup=table.reference_ms / trial.predicted_ms if trial.predicted_ms else None,
            rms_kernel_error=trial.rms_kernel_error, original_ms=dict(table.original_ms),
            original_ms_cached=table.original_cached, skipped_formats=dict(table.skipped_formats),
            aimed_from_earlier_tries=len(prior), round_to=round_to,
            timings_cached=bool(cache.path) and not busy,
            layer_time_scale=dict(table.scales), history=[t.record() for t in trials])
        return trial.layers if trial.measured_speedup >= 1.0 else _dense_fallback(layers)
