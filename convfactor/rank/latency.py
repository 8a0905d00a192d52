"""Measured-latency building blocks: a timing cache, layer/model timing, and the per-layer choice.

Timings are medians after warm-up from :func:`convfactor.measure.latency.measure_latency` (threads
set explicitly), or from an injected ``timer(module, inputs) -> seconds`` (tests use a fake one,
so planning decisions are deterministic).  A :class:`LatencyCache` keys every figure by the
device, CPU, threads, torch version, dtype, input shape (batch included), memory format and the
module's structure, so identical layers (EDSR's 32 body convs) are timed once, and a cache file
can be reused across runs on the same machine.

:func:`choose` is the multiple-choice knapsack at the heart of the planner: per layer one option
(dense, or a candidate that is faster than dense), minimizing the summed squared kernel error
under a total-time budget (or the time under an error budget), by a Lagrangian sweep followed by
a greedy fill of the remaining slack.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..measure.allocator import malloc_setting
from ..measure.backends import TimingBackend, backend_class, check_backend_name, get_backend, prepare_one
from ..measure.compare import SpeedComparison, compare_speed
from ..measure.latency import environment
from ..utils import as_inputs, parse_configured, torch_threads
from .target import SpeedupBand

__all__ = ["LatencyCache", "LatencyConfig", "LayerTimer", "Option", "choose", "compare_models", "env_key",
           "DEFAULT_RATIOS", "MEMORY_FORMATS", "default_cache_path", "model_signature"]

Timer = Callable[[nn.Module, tuple], float]
#: per-layer MACs ratios tried as latency candidates
DEFAULT_RATIOS = (0.08, 0.12, 0.18, 0.25, 0.33, 0.42, 0.5, 0.6, 0.7, 0.8)
MEMORY_FORMATS = ("contiguous", "channels_last", "channels_last_3d")


@functools.lru_cache(maxsize=None)
def _machine(threads: int | None, malloc: str) -> tuple:
    env = environment(threads)
    keys = ("device", "cpu", "threads", "torch", "cuda_device")
    return tuple((k, env[k]) for k in keys if k in env) + (("malloc", malloc),)


def env_key(threads: int | None, dtype, input_shape: Sequence[int], memory_format: str, timer=None,
            backend: str = "torch") -> dict:
    """What a timing depends on besides the module: machine, threads, allocator, back-end, dtype, input
    shape, memory format."""
    key = dict(_machine(threads or torch.get_num_threads(), malloc_setting()))
    key.update(dtype=str(dtype), input_shape=list(input_shape), memory_format=memory_format)
    if backend != "torch":
        key["backend"] = backend
        key["runtime"] = get_backend(backend).runtime_version()
    if timer is not None:
        # an injected timer: its own ``cache_tag`` (or its repr) keeps differently set-up fakes apart
        key["timer"] = str(getattr(timer, "cache_tag", None) or repr(timer))
    return key


class LatencyCache:
    """``key -> milliseconds`` (layer and original-model timings), plus earlier end-to-end tries per
    timing table (``trials``: ``[predicted, measured]`` speed-ups, used only to aim the first try of a
    later plan); in memory, optionally persisted as JSON at ``path``."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.data: dict[str, float] = {}
        self.trials: dict[str, list[list[float]]] = {}
        self.hits = 0
        self.misses = 0
        if self.path and self.path.is_file():
            raw = json.loads(self.path.read_text())
            if "timings" not in raw:            # the flat layout of earlier versions
                raw = {"timings": raw, "trials": {}}
            self.data = {str(k): float(v) for k, v in raw["timings"].items()}
            self.trials = {str(k): [[float(a), float(b)] for a, b in v] for k, v in raw.get("trials", {}).items()}

    @staticmethod
    def key(env: dict, signature: str) -> str:
        return json.dumps({"env": env, "module": signature}, sort_keys=True)

    def get(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, ms: float) -> None:
        self.data[key] = float(ms)

    def add_trials(self, key: str, pairs: Sequence[tuple[float, float]], keep: int = 8) -> None:
        """Remember ``(predicted, measured)`` speed-ups of a timing table's tries (the last ``keep``)."""
        self.trials[key] = (self.trials.get(key, []) + [[float(a), float(b)] for a, b in pairs])[-keep:]

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)      # e.g. ~/.cache/convfactor on a fresh machine
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"timings": self.data, "trials": self.trials}, indent=0))
            tmp.replace(self.path)


@dataclass(frozen=True)
class LatencyConfig:
    """How the latency planner measures and when it stops.

    ``threads``: torch threads while timing (None: torch's); ``timer``: an injected
    ``(module, inputs) -> seconds`` (deterministic tests); ``cache``: a :class:`LatencyCache` or a
    JSON path reused across runs; ``formats``: memory formats tried; ``ratios``: per-layer MACs ratios
    tried as candidates; ``repeats``/``min_run_time``: per-layer timing; ``e2e_rounds``/``e2e_repeats``:
    the interleaved end-to-end checks, which add rounds up to ``e2e_max_rounds`` until the speed-up's
    95% interval is within ``±rel_halfwidth``; ``max_iter``: tries; ``min_gain``: a candidate must beat
    the dense layer by this fraction; ``max_aim_factor``: the aim never exceeds this multiple of the
    first aim, so a noisy check cannot push the plan to far more MACs reduction than needed.
    ``format_slack``: a memory format whose original model is slower than the fastest by more than this
    fraction gets no layer table (its factorized forms gain no more from it; measured per model, and
    the plan lists what was skipped); None searches every format.
    ``backend``: ``torch`` (eager), ``compile`` (layers timed eagerly, since compiling every
    candidate costs seconds each; the end-to-end checks compiled) or ``onnxruntime`` (layers and
    checks in ONNX Runtime).  ``cache``: ``"auto"`` keeps layer timings in
    :func:`default_cache_path` across runs (not with an injected timer), None keeps them in memory.  Accepted band: ``request * [1 - band, 1 + band]``, or with
    ``margin`` the band of :meth:`SpeedupBand.at_least` (plans that must measure at least the request).
    """

    threads: int | None = None
    timer: Timer | None = None
    cache: LatencyCache | str | Path | None = "auto"
    formats: tuple[str, ...] = ("contiguous", "channels_last")
    backend: str = "torch"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    repeats: int = 6
    min_run_time: float = 0.0
    e2e_rounds: int = 3
    e2e_repeats: int = 2
    max_iter: int = 5
    band: float = 0.10
    margin: float | None = None
    min_gain: float = 0.02
    e2e_max_rounds: int = 9
    rel_halfwidth: float = 0.05
    max_aim_factor: float = 2.0
    format_slack: float | None = 0.05

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        bad = [f for f in self.formats if f not in MEMORY_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be among {', '.join(MEMORY_FORMATS)}, got {list(self.formats)}")
        if not 0 <= self.band < 1:
            raise ValueError(f"band must be in [0, 1), got {self.band}")
        if self.margin is not None and not 0 <= self.margin < 1:
            raise ValueError(f"plan margin must be in [0, 1), got {self.margin}")
        check_backend_name(self.backend)
        if self.format_slack is not None and self.format_slack < 0:
            raise ValueError(f"format_slack must be >= 0 or None, got {self.format_slack}")
        if self.e2e_max_rounds < self.e2e_rounds or self.max_aim_factor < 1:
            raise ValueError("need e2e_max_rounds >= e2e_rounds and max_aim_factor >= 1")
        for name in ("repeats", "e2e_rounds", "e2e_repeats", "max_iter"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def searched_formats(self, original_ms: dict[str, float]) -> list[str]:
        """The formats given a layer table: within ``format_slack`` of the original's fastest."""
        if self.format_slack is None:
            return list(original_ms)
        best = min(original_ms.values())
        return [f for f, t in original_ms.items() if t <= (1 + self.format_slack) * best]

    def speedup_band(self, request: float) -> SpeedupBand:
        """The band a measured speed-up must land in for a request of ``request`` x."""
        if self.margin is not None:
            return SpeedupBand.at_least(request, self.margin)
        return SpeedupBand.around(request, self.band)

    def open_cache(self) -> "LatencyCache":
        """The timing cache: the given one, one read from the given path, or a fresh in-memory one."""
        if isinstance(self.cache, LatencyCache):
            return self.cache
        if self.cache == "auto":
            return LatencyCache(None if self.timer is not None else default_cache_path())
        return LatencyCache(self.cache)

    def formats_for(self, example: torch.Tensor) -> list[str]:
        """The formats to try for an input like ``example`` (only 4-D/5-D inputs have channels-last forms;
        a runtime with a layout of its own, ONNX Runtime or OpenVINO, has one form)."""
        own_layout = backend_class(parse_configured(self.backend)[0]).own_layout
        return ["contiguous"] if own_layout or example.dim() not in (4, 5) else list(self.formats)

    @property
    def layer_backend(self) -> str:
        """The back-end of the per-layer table (compile's per-layer compilations would cost seconds each)."""
        return "torch" if parse_configured(self.backend)[0] == "compile" else self.backend

    def layer_timer(self, cache: "LatencyCache") -> "LayerTimer":
        return LayerTimer(threads=self.threads, timer=self.timer, repeats=self.repeats,
                          min_run_time=self.min_run_time, cache=cache, backend=self.layer_backend)

    def compare(self, models: dict[str, tuple[nn.Module, str]], example_input) -> dict[str, float]:
        """:func:`compare_models` with the end-to-end settings (the original in each form, step 1)."""
        return compare_models(models, example_input, threads=self.threads, timer=self.timer,
                              rounds=self.e2e_rounds, repeats=self.e2e_repeats, min_run_time=self.min_run_time,
                              backend=self.backend)

    def original_times(self, model: nn.Module, example_input, formats: Sequence[str],
                       cache: "LatencyCache") -> tuple[dict[str, float], bool]:
        """``(ms per format, from cache)``: the original model in each format (step 1), looked up in
        ``cache`` by the model's structure (:func:`model_signature`) and timed only when missing, so
        that a warm plan's only model-level timing is the end-to-end checks.  The checks re-time the
        original next to every try, so a stale figure can move the aim but never the verdict."""
        inputs = as_inputs(example_input)
        x = inputs[0]
        sig = json.dumps({"model": model_signature(model), "inputs": [list(t.shape) for t in inputs]})
        keys = {f: cache.key(env_key(self.threads, x.dtype, x.shape, f, self.timer, self.backend), sig)
                for f in formats}
        found = {f: cache.get(k) for f, k in keys.items()}
        if all(v is not None for v in found.values()):
            return {f: float(v) for f, v in found.items()}, True
        times = self.compare({f: (model, f) for f in formats}, example_input)
        for f, k in keys.items():
            cache.put(k, times[f])
        return times, False

    def verify(self, original: nn.Module, candidate: nn.Module, example_input, formats: Sequence[str]
               ) -> SpeedComparison:
        """The end-to-end check of a try: both models interleaved in ``formats`` on the chosen back-end,
        adding rounds until the speed-up's 95% interval is tight (or ``e2e_max_rounds``)."""
        return compare_speed(original, candidate, example_input, threads=self.threads, backend=self.backend,
                             memory_formats=tuple(dict.fromkeys(formats)), repeats=self.e2e_rounds * self.e2e_repeats,
                             rounds=self.e2e_rounds, max_rounds=self.e2e_max_rounds, warmup=2,
                             rel_halfwidth=self.rel_halfwidth, timer=self.timer, count_macs=False)


@dataclass
class LayerTimer:
    """Times single layers on their real input shape through a timing back-end and a :class:`LatencyCache`."""

    threads: int | None = None
    timer: Timer | None = None
    repeats: int = 15
    warmup: int = 3
    min_run_time: float = 0.0
    cache: LatencyCache = field(default_factory=LatencyCache)
    backend: str = "torch"

    def time(self, module: nn.Module, input_shape: Sequence[int], signature: str, *, dtype=torch.float32,
             memory_format: str = "contiguous") -> float:
        """Median milliseconds of ``module`` on a random input of ``input_shape``."""
        return self.time_group([(module, signature)], input_shape, dtype=dtype, memory_format=memory_format,
                               rounds=1)[0]

    def time_group(self, items: list[tuple[nn.Module, str]], input_shape: Sequence[int], *, dtype=torch.float32,
                   memory_format: str = "contiguous", rounds: int = 3) -> list[float]:
        """Median ms of each ``(module, signature)`` on one input, measured round-robin.

        A layer's dense form and its candidates are timed interleaved (``rounds`` rounds of
        ``repeats / rounds`` each, median of all), so a load spike on a shared machine hits them
        alike and their ratios hold.  Cached entries are not re-timed.
        """
        env = env_key(self.threads, dtype, input_shape, memory_format, self.timer, self.backend)
        keys = [self.cache.key(env, sig) for _, sig in items]
        out: list[float | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)).to(dtype)
            samples = _round_robin({i: items[i][0] for i in todo}, (x,), memory_format, self._settings(rounds))
            for i in todo:
                out[i] = statistics.median(samples[i])
                self.cache.put(keys[i], out[i])
        return [float(v) for v in out]

    def _settings(self, rounds: int) -> "_RoundRobin":
        rounds = max(1, min(rounds, self.repeats))
        return _RoundRobin(get_backend(self.backend, timer=self.timer), rounds, max(1, self.repeats // rounds),
                           self.warmup, self.threads, self.min_run_time)


@dataclass(frozen=True)
class _RoundRobin:
    backend: TimingBackend
    rounds: int
    per_round: int
    warmup: int
    threads: int | None
    min_run_time: float


def _round_robin(modules: dict, inputs: tuple, memory_format: str, how: _RoundRobin) -> dict[object, list[float]]:
    """Samples (ms) of each module, prepared once by the back-end, timed interleaved over the rounds."""
    with torch_threads(how.threads):
        runnables = {k: prepare_one(how.backend, copy.deepcopy(m).eval(), inputs, memory_format)
                     for k, m in modules.items()}
    samples: dict[object, list[float]] = {k: [] for k in modules}
    for r in range(how.rounds):
        for k, runnable in runnables.items():
            samples[k] += how.backend.time(runnable, repeats=how.per_round, warmup=how.warmup if r == 0 else 1,
                                           threads=how.threads, min_run_time=how.min_run_time)
    return samples


def compare_models(models: dict[str, tuple[nn.Module, str]], example_input, *, threads: int | None = None,
                   timer: Timer | None = None, rounds: int = 5, repeats: int = 5, warmup: int = 2,
                   min_run_time: float = 0.0, backend: str = "torch") -> dict[str, float]:
    """Median ms of each ``name -> (model, memory_format)``, measured interleaved (round-robin).

    Interleaving puts slow drifts of a shared machine on every model alike, so the ratios hold
    even when absolute times wander.  The models are deep-copied (formats are set on the copies).
    """
    inputs = as_inputs(example_input)
    how = _RoundRobin(get_backend(backend, timer=timer), max(1, rounds), repeats, warmup, threads, min_run_time)
    out = {}
    for fmt in dict.fromkeys(f for _, f in models.values()):
        group = {name: m for name, (m, f) in models.items() if f == fmt}
        out.update({name: statistics.median(t) for name, t in _round_robin(group, inputs, fmt, how).items()})
    return out


def model_signature(model: nn.Module) -> str:
    """A digest of what a model's run time depends on: its module tree (``repr``), and the name, shape
    and dtype of every parameter and buffer; not the values (a dense float kernel runs as fast
    whatever its weights)."""
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in
               [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]]
    text = json.dumps({"repr": repr(model), "type": type(model).__qualname__, "tensors": tensors})
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_path() -> Path:
    """Where layer timings persist across runs: ``$CONVFACTOR_CACHE_DIR`` or ``~/.cache/convfactor``,
    file ``latency.json`` (entries are keyed by machine, threads, allocator and back-end)."""
    root = os.environ.get("CONVFACTOR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "convfactor")
    return Path(root) / "latency.json"


@dataclass
class Option:
    """One choice for one layer: ``method None`` is the dense layer."""

    method: str | None
    ranks: tuple[int, ...] | None
    ms: float
    error: float          # relative kernel error
    macs: int = 0
    params: int = 0
    options: dict | None = None     # the method's non-default options (e.g. sliced_svd's slices)


def _pick(options: list[list[Option]], lam: float, mode: str) -> list[int]:
    # mode 'time': minimize err^2 + lam * ms ;  mode 'error': minimize ms + lam * err^2
    out = []
    for opts in options:
        if mode == "time":
            out.append(min(range(len(opts)), key=lambda i: (opts[i].error ** 2 + lam * opts[i].ms, opts[i].ms)))
        else:
            out.append(min(range(len(opts)), key=lambda i: (opts[i].ms + lam * opts[i].error ** 2, opts[i].error)))
    return out


def _total(options: list[list[Option]], choice: Sequence[int], mode: str) -> float:
    """Summed ms (mode 'time': what the budget limits) or summed squared error (mode 'error')."""
    if mode == "time":
        return sum(options[l][i].ms for l, i in enumerate(choice))
    return sum(options[l][i].error ** 2 for l, i in enumerate(choice))


def choose(options: list[list[Option]], *, time_budget: float | None = None,
           error_budget: float | None = None) -> tuple[list[int], bool]:
    """Per layer an index into its options (index 0 must be dense).

    ``time_budget``: minimize ``sum err^2`` subject to ``sum ms <= time_budget``.
    ``error_budget``: minimize ``sum ms`` subject to ``sum err^2 <= error_budget``.
    Returns ``(choice, feasible)``; infeasible gives the fastest (resp. most accurate) choice.
    """
    if (time_budget is None) == (error_budget is None):
        raise ValueError("give exactly one of time_budget=, error_budget=")
    mode = "time" if time_budget is not None else "error"
    budget = time_budget if mode == "time" else error_budget
    # The extreme where the budget weighs infinitely: fastest (or most accurate) everywhere.
    extreme = _pick(options, 1e30, mode)
    if _total(options, extreme, mode) > budget + 1e-12:
        return extreme, False
    # Smallest multiplier whose choice fits; bisect in log space.
    lo, hi = -30.0, 30.0
    best = extreme
    for _ in range(80):
        mid = (lo + hi) / 2
        c = _pick(options, math.exp(mid), mode)
        if _total(options, c, mode) <= budget + 1e-12:
            best, hi = c, mid
        else:
            lo = mid
    return _spend_slack(options, list(best), budget, mode), True


def _spend_slack(options: list[list[Option]], best: list[int], budget: float, mode: str) -> list[int]:
    """Greedy fill: spend the remaining slack on the moves that buy the most (gain per cost)."""
    while True:
        slack = budget - _total(options, best, mode)
        move = None
        for l, opts in enumerate(options):
            cur = opts[best[l]]
            for i, o in enumerate(opts):
                if mode == "time":
                    cost, gain = o.ms - cur.ms, cur.error ** 2 - o.error ** 2
                else:
                    cost, gain = o.error ** 2 - cur.error ** 2, cur.ms - o.ms
                if gain > 1e-15 and cost <= slack + 1e-12:
                    key = gain / max(cost, 1e-15)
                    if move is None or key > move[0]:
                        move = (key, l, i)
        if move is None:
            return best
        best[move[1]] = move[2]
