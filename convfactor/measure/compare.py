"""Honest speed-ups: original vs compressed, measured in one process, against the original's
*fastest* form.

"MACs dropped but it is not faster" is the most common complaint about compression tools; its
usual cause is a comparison that flatters the compressed model (a channels_last factorized model
against an NCHW dense one, or against a slower eager baseline).  :func:`compare_speed` therefore
times every form of both models (memory formats x eager / ``torch.compile``), interleaved in
rounds so that drift of a shared machine hits both alike, and reports

* ``speedup``: the original's fastest median / the compressed model's fastest median;
* ``same_form``: per form, original / compressed in that same form;
* ``efficiency``: ``speedup`` divided by the MAC reduction (1.0 = the theory is delivered).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..utils import as_inputs, torch_threads
from .backends import FORMS, CompileBackend, EagerBackend, Runnable, TimingBackend, get_backend
from .count import count
from .latency import environment, latency_of

__all__ = ["compare_speed", "SpeedComparison", "TimingConfig", "Verdict", "prepare_forms", "ratio_interval"]


@dataclass(frozen=True)
class Verdict:
    """A measured speed-up judged against a request, in one plain line.

    ``kind``: ``"met"`` (the interval's lower edge clears the request), ``"missed"`` (its upper edge is
    below the request), ``"unconfirmed"`` (the interval straddles the request: a busy machine or a
    close call), or ``"slower"`` (its upper edge is below 1: slower than the original, with confidence).
    """

    kind: str
    line: str

    @property
    def ok(self) -> bool:
        return self.kind == "met"


@dataclass
class TimingConfig:
    """How :func:`compare_speed` times.  ``rounds`` interleaved rounds always run; with
    ``max_rounds`` above it, more rounds follow until the 95% interval of the speed-up is within
    ``±rel_halfwidth`` of the estimate, ``max_rounds`` is reached or ``max_seconds`` have passed."""

    threads: int | None = None
    backend: str | TimingBackend = "torch"
    #: the back-end the *original* is timed on when it differs (e.g. ``openvino`` in fp32 while the
    #: compressed model runs ``openvino:precision=bf16``: what a lower precision buys against today's
    #: deployment); None: both on ``backend``
    baseline: str | TimingBackend | None = None
    memory_formats: tuple[str, ...] = FORMS
    compile: bool = False                   # also time torch.compile forms (with the torch back-end)
    repeats: int = 15                       # timed calls per form over the first ``rounds`` rounds
    rounds: int = 3
    warmup: int = 3
    min_run_time: float = 0.0
    timer: Callable | None = None           # ``(module, inputs) -> seconds`` replaces the clock (tests)
    max_rounds: int | None = None           # None: exactly ``rounds`` rounds
    rel_halfwidth: float = 0.05
    max_seconds: float = 300.0
    drift_limit: float = 0.25               # the original's per-round medians may differ by this much
    count_macs: bool = True                 # also count both models' MACs (a FlopCounterMode forward each)

    def __post_init__(self):
        if self.rounds < 1 or self.repeats < 1 or (self.max_rounds is not None and self.max_rounds < self.rounds):
            raise ValueError(f"need rounds >= 1, repeats >= 1 and max_rounds >= rounds, got {self}")

    @property
    def per_round(self) -> int:
        return max(1, self.repeats // self.rounds)


@dataclass
class SpeedComparison:
    original: dict[str, dict | str]          # form -> Latency.to_dict() (or the reason it could not run)
    compressed: dict[str, dict | str]
    original_best: str
    compressed_best: str
    speedup: float                           # fastest original / fastest compressed (medians)
    same_form: dict[str, float]              # form -> original / compressed in that form
    macs_original: int | None = None
    macs_compressed: int | None = None
    env: dict = field(default_factory=dict)
    interval: tuple[float, float] | None = None   # 95% bootstrap interval of ``speedup``
    rounds: int = 0
    noise: list[str] = field(default_factory=list)  # why the figure is not trustworthy; empty when it is
    setup_s: dict[str, float] = field(default_factory=dict)  # compile / export time per form, not timed

    @property
    def macs_reduction(self) -> float | None:
        if not self.macs_original or not self.macs_compressed:
            return None
        return self.macs_original / self.macs_compressed

    @property
    def efficiency(self) -> float | None:
        """Speed-up over MAC reduction; None when the two models ran at different precisions (a bf16
        or int8 speed-up is not what removed MACs bought)."""
        r = self.macs_reduction
        return self.speedup / r if r and not self.env.get("baseline") else None

    @property
    def noisy(self) -> bool:
        """True when the machine was too busy for the figure to be trusted (``noise`` says why)."""
        return bool(self.noise)

    @property
    def confident_speedup(self) -> float:
        """The interval's lower edge: the speed-up that holds with confidence."""
        return self.interval[0] if self.interval else self.speedup

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(macs_reduction=self.macs_reduction, efficiency=self.efficiency, noisy=self.noisy)
        return d

    def verdict(self, request: float = 1.0) -> Verdict:
        """This speed-up judged against ``request`` (x) by its 95% interval, never by the median alone."""
        lo, hi = self.interval or (self.speedup, self.speedup)
        figure = f"{self.speedup:.2f}x measured (95% interval {lo:.2f}-{hi:.2f}x, {self.rounds} rounds)"
        why = f"; {'; '.join(self.noise)}" if self.noise else ""
        if hi < 1.0:
            return Verdict("slower", f"SLOWER THAN THE ORIGINAL: {figure}{why}")
        if lo >= request:       # confirmed by the interval; a busy machine's caveats stay on the line
            busy = f" (on a busy machine{why})" if self.noise else ""
            return Verdict("met", f"target met: {figure} against a {request:g}x request{busy}")
        if hi < request:
            return Verdict("missed", f"TARGET MISSED: {figure} against a {request:g}x request{why}")
        return Verdict("unconfirmed", f"NOT CONFIRMED: {figure} does not clear the {request:g}x request "
                                      f"with confidence{why}")

    def summary(self) -> str:
        eff = f", efficiency {self.efficiency:.2f}" if self.efficiency is not None else ""
        macs = f" (MACs / {self.macs_reduction:.2f})" if self.macs_reduction else ""
        ci = f" [95% interval {self.interval[0]:.2f}-{self.interval[1]:.2f}x]" if self.interval else ""
        return (f"speed-up {self.speedup:.2f}x{ci}{macs}{eff}: original fastest as {self.original_best} "
                f"({self.original[self.original_best]['median_ms']:.3f} ms), compressed fastest as "
                f"{self.compressed_best} ({self.compressed[self.compressed_best]['median_ms']:.3f} ms)"
                + (f" [noisy: {'; '.join(self.noise)}]" if self.noisy else ""))


def _backends(cfg: TimingConfig, backend: str | TimingBackend | None = None) -> list[TimingBackend]:
    first = get_backend(backend or cfg.backend, threads=cfg.threads, memory_formats=tuple(cfg.memory_formats))
    extra = [CompileBackend(tuple(cfg.memory_formats))] if cfg.compile and isinstance(first, EagerBackend) else []
    return [get_backend(b, timer=cfg.timer) for b in [first, *extra]]


def prepare_forms(models: dict[str, nn.Module], inputs: tuple, backends: list[TimingBackend],
                  baseline: list[TimingBackend] | None = None
                  ) -> tuple[dict[str, dict[str, Runnable | str]], dict[str, TimingBackend]]:
    """``{which: {form: Runnable or reason}}`` for every model and back-end, and each form's back-end;
    with ``baseline``, the ``"original"`` model is prepared on those back-ends instead."""
    forms: dict[str, dict[str, Runnable | str]] = {which: {} for which in models}
    backend_of: dict[str, TimingBackend] = {}
    for which, model in models.items():
        for backend in (baseline if baseline and which == "original" else backends):
            prepared = backend.prepare(model, inputs)
            forms[which].update(prepared)
            backend_of.update({form: backend for form in prepared})
    return forms, backend_of


def _macs(model: nn.Module, inputs: tuple) -> int | None:
    try:
        return count(model, inputs)["macs"]
    except Exception:  # noqa: BLE001 - counting is informative only
        return None


def _one_round(forms: dict, backend_of: dict, cfg: TimingConfig, r: int) -> dict[tuple[str, str], list[float]]:
    """One interleaved round: per form, original then compressed (the order flips every round)."""
    order = ("original", "compressed") if r % 2 == 0 else ("compressed", "original")
    out = {}
    for form in dict.fromkeys([*forms["original"], *forms["compressed"]]):
        for which in order:
            entry = forms[which].get(form)
            if isinstance(entry, Runnable):
                out[(which, form)] = backend_of[form].time(entry, repeats=cfg.per_round, threads=cfg.threads,
                                                          warmup=cfg.warmup if r == 0 else 1,
                                                          min_run_time=cfg.min_run_time)
    return out


def ratio_interval(orig_rounds: list[list[float]], comp_rounds: list[list[float]],
                    n_boot: int = 400) -> tuple[float, float]:
    """95% percentile bootstrap interval of median(original) / median(compressed).

    Rounds are resampled as blocks (paired in time, so drift between rounds widens the interval);
    with fewer than three rounds the single samples are resampled instead."""
    rng = np.random.default_rng(0)
    if len(orig_rounds) >= 3:
        o = [np.asarray(r) for r in orig_rounds]
        c = [np.asarray(r) for r in comp_rounds]
        picks = rng.integers(0, len(o), size=(n_boot, len(o)))
        ratios = [np.median(np.concatenate([o[i] for i in p])) / np.median(np.concatenate([c[i] for i in p]))
                  for p in picks]
    else:
        o, c = np.concatenate(orig_rounds), np.concatenate(comp_rounds)
        ratios = np.median(rng.choice(o, (n_boot, o.size)), 1) / np.median(rng.choice(c, (n_boot, c.size)), 1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def compare_speed(original: nn.Module, compressed: nn.Module, example_input, config: TimingConfig | None = None,
                  **settings) -> SpeedComparison:
    """Time both models in every form, in the same process, and compare against the fastest original.

    ``config`` (or its fields as keywords: ``threads``, ``backend``, ``repeats``, ``rounds``,
    ``max_rounds``, ``timer``, ...) says how; other keywords are recorded in ``env``.  Each round
    times every form of both models, interleaved, so drift of a shared machine hits both alike.
    """
    names = {f.name for f in fields(TimingConfig)}
    cfg = config or TimingConfig(**{k: v for k, v in settings.items() if k in names})
    env_extra = {k: v for k, v in settings.items() if k not in names}
    inputs = as_inputs(example_input)
    threads = cfg.threads or torch.get_num_threads()
    backends = _backends(cfg)
    baseline = _backends(cfg, cfg.baseline) if cfg.baseline is not None else None
    with torch_threads(threads):
        forms, backend_of = prepare_forms({"original": original, "compressed": compressed}, inputs, backends,
                                          baseline)
    rounds = _timed_rounds(forms, backend_of, cfg)
    result = _summarize(forms, rounds)
    result.env = environment(threads, batch=int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None,
                             input_shape=list(inputs[0].shape), dtype=str(inputs[0].dtype),
                             device=str(inputs[0].device), **backends[0].describe(),
                             **({"baseline": baseline[0].key} if baseline and baseline[0].key != backends[0].key
                                else {}), **env_extra)
    if cfg.count_macs:
        result.macs_original, result.macs_compressed = _macs(original, inputs), _macs(compressed, inputs)
    result.setup_s = {f"{which}/{k}": v.setup_s for which in forms for k, v in forms[which].items()
                      if isinstance(v, Runnable) and v.setup_s}
    result.noise = _noise(result, rounds, cfg)
    return result


def _timed_rounds(forms: dict, backend_of: dict, cfg: TimingConfig) -> list[dict[tuple[str, str], list[float]]]:
    """Interleaved rounds: ``cfg.rounds`` always, then more while the interval is too wide."""
    rounds, start = [], time.perf_counter()
    limit = cfg.max_rounds or cfg.rounds
    while len(rounds) < limit:
        rounds.append(_one_round(forms, backend_of, cfg, len(rounds)))
        if len(rounds) < cfg.rounds:
            continue
        if time.perf_counter() - start > cfg.max_seconds or _tight_enough(forms, rounds, cfg):
            break
    return rounds


def _best_pair(forms: dict, rounds: list[dict]) -> tuple[str, str]:
    """The fastest form of each model, by the median over every round."""
    def best(which: str) -> str:
        ran = [f for f, v in forms[which].items() if isinstance(v, Runnable)]
        if not ran:
            raise ValueError(f"nothing could be measured for the {which} model: {forms[which]}")
        return min(ran, key=lambda f: statistics.median([t for r in rounds for t in r[(which, f)]]))
    return best("original"), best("compressed")


def _interval(forms: dict, rounds: list[dict]) -> tuple[float, float]:
    best_o, best_c = _best_pair(forms, rounds)
    return ratio_interval([r[("original", best_o)] for r in rounds], [r[("compressed", best_c)] for r in rounds])


def _tight_enough(forms: dict, rounds: list[dict], cfg: TimingConfig) -> bool:
    best_o, best_c = _best_pair(forms, rounds)
    ratio = (statistics.median([t for r in rounds for t in r[("original", best_o)]])
             / statistics.median([t for r in rounds for t in r[("compressed", best_c)]]))
    lo, hi = _interval(forms, rounds)
    return (hi - lo) / 2 <= cfg.rel_halfwidth * ratio


def _summarize(forms: dict, rounds: list[dict]) -> SpeedComparison:
    """Per-form latencies over every round, the fastest forms and the speed-up with its interval."""
    def latencies(which: str) -> dict[str, dict | str]:
        out: dict[str, dict | str] = {}
        for form, entry in forms[which].items():
            if not isinstance(entry, Runnable):
                out[form] = entry
                continue
            env = {"memory_format": form.split("/")[-1], "compiled": form.startswith("compiled/"), "form": form}
            out[form] = latency_of([t for r in rounds for t in r[(which, form)]], env).to_dict()
        return out

    orig, comp = latencies("original"), latencies("compressed")
    best_o, best_c = _best_pair(forms, rounds)
    same = {k: orig[k]["median_ms"] / comp[k]["median_ms"] for k in orig
            if isinstance(orig[k], dict) and isinstance(comp.get(k), dict)}
    return SpeedComparison(original=orig, compressed=comp, original_best=best_o, compressed_best=best_c,
                           speedup=orig[best_o]["median_ms"] / comp[best_c]["median_ms"], same_form=same,
                           interval=_interval(forms, rounds), rounds=len(rounds))


def _noise(res: SpeedComparison, rounds: list[dict], cfg: TimingConfig) -> list[str]:
    """Why ``res`` cannot be trusted: wide spread within a form, drift of the original between
    rounds, or an interval wider than ``±cfg.rel_halfwidth``."""
    reasons = []
    for name, side, best in (("original", res.original, res.original_best),
                             ("compressed", res.compressed, res.compressed_best)):
        if side[best]["iqr_ms"] > 0.25 * side[best]["median_ms"]:
            reasons.append(f"the {name}'s IQR is {side[best]['iqr_ms'] / side[best]['median_ms']:.0%} of its median")
    per_round = [statistics.median(r[("original", res.original_best)]) for r in rounds]
    if len(per_round) > 1 and max(per_round) > (1 + cfg.drift_limit) * min(per_round):
        reasons.append(f"the original's time drifted {max(per_round) / min(per_round) - 1:.0%} between rounds")
    lo, hi = res.interval
    if (hi - lo) / 2 > cfg.rel_halfwidth * res.speedup:
        reasons.append(f"the 95% interval {lo:.2f}-{hi:.2f}x is wider than +-{cfg.rel_halfwidth:.0%} "
                       f"after {res.rounds} rounds")
    return reasons

