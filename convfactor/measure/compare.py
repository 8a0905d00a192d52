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

import copy
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .latency import FORMS, Latency, compiled, environment, measure_latency, to_memory_format

__all__ = ["compare_speed", "SpeedComparison", "prepare_forms", "compare_in_fresh_process"]


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

    @property
    def macs_reduction(self) -> float | None:
        if not self.macs_original or not self.macs_compressed:
            return None
        return self.macs_original / self.macs_compressed

    @property
    def efficiency(self) -> float | None:
        r = self.macs_reduction
        return self.speedup / r if r else None

    @property
    def noisy(self) -> bool:
        """True when either fastest form's IQR exceeds 25% of its median (a busy machine: re-run)."""
        return any(f[b]["iqr_ms"] > 0.25 * f[b]["median_ms"]
                   for f, b in ((self.original, self.original_best), (self.compressed, self.compressed_best)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"] = self.macs_reduction
        d["efficiency"] = self.efficiency
        d["noisy"] = self.noisy
        return d

    def summary(self) -> str:
        eff = f", efficiency {self.efficiency:.2f}" if self.efficiency is not None else ""
        macs = f" (MACs / {self.macs_reduction:.2f})" if self.macs_reduction else ""
        return (f"speed-up {self.speedup:.2f}x{macs}{eff}: original fastest as {self.original_best} "
                f"({self.original[self.original_best]['median_ms']:.3f} ms), compressed fastest as "
                f"{self.compressed_best} ({self.compressed[self.compressed_best]['median_ms']:.3f} ms)"
                + (" [noisy: IQR > 25% of the median; the machine was busy]" if self.noisy else ""))


def prepare_forms(module: nn.Module, inputs: tuple, memory_formats=FORMS, compile: bool = False,
                  fake: bool = False) -> dict[str, tuple[Callable, tuple] | str]:
    """``form -> (callable, inputs)`` for each form that can run, else ``form -> reason``."""
    forms: dict[str, tuple[Callable, tuple] | str] = {}
    for fmt in memory_formats:
        if fmt == "channels_last" and not all(t.dim() == 4 for t in inputs if isinstance(t, torch.Tensor)):
            forms[fmt] = "channels_last needs 4-D inputs"
            continue
        m, x = to_memory_format(copy.deepcopy(module).eval(), inputs, fmt)
        forms[fmt] = (m, x)
        if compile:
            fn, why = (m, None) if fake else compiled(m, x)
            forms[f"compiled/{fmt}"] = (fn, x) if fn is not None else f"torch.compile failed: {why}"
    return forms


def _macs(model: nn.Module, inputs: tuple) -> int | None:
    try:
        from .count import count
        return count(model, inputs)["macs"]
    except Exception:  # noqa: BLE001 - counting is informative only
        return None


def compare_speed(original: nn.Module, compressed: nn.Module, example_input, *, threads: int | None = None,
                  memory_formats=FORMS, compile: bool = False, repeats: int = 15, rounds: int = 3,
                  warmup: int = 3, min_run_time: float = 0.0, timer: Callable | None = None,
                  **env_extra) -> SpeedComparison:
    """Time both models in every form, in the same process, and compare against the fastest original.

    ``repeats`` timed calls per form are split over ``rounds`` interleaved rounds (original form 1,
    compressed form 1, original form 2, ...).  ``timer`` (``(module, inputs) -> seconds``) replaces
    the clock, for tests.  ``threads`` is set explicitly for the timing (default: the current count).
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forms = {"original": prepare_forms(original, inputs, memory_formats, compile, fake=timer is not None),
                 "compressed": prepare_forms(compressed, inputs, memory_formats, compile, fake=timer is not None)}
    finally:
        torch.set_num_threads(previous)
    per_round = max(1, repeats // max(1, rounds))
    times: dict[tuple[str, str], list[float]] = {}
    envs: dict[tuple[str, str], dict] = {}
    for r in range(max(1, rounds)):
        for form in forms["original"]:
            for which in ("original", "compressed"):
                entry = forms[which].get(form)
                if not isinstance(entry, tuple):
                    continue
                fn, x = entry
                lat = measure_latency(fn, x, threads=threads, repeats=per_round, warmup=warmup if r == 0 else 1,
                                      min_run_time=min_run_time, timer=timer, **env_extra)
                times.setdefault((which, form), []).extend(lat.times_ms)
                envs[(which, form)] = lat.env

    def summarize(which: str) -> dict[str, dict | str]:
        out: dict[str, dict | str] = {}
        for form, entry in forms[which].items():
            if not isinstance(entry, tuple):
                out[form] = entry
                continue
            t = times[(which, form)]
            q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
            env = dict(envs[(which, form)])
            env["memory_format"] = form.split("/")[-1]
            env["compiled"] = form.startswith("compiled/")
            out[form] = Latency(statistics.median(t), q[2] - q[0], t, env).to_dict()
        return out

    orig, comp = summarize("original"), summarize("compressed")
    ran_o = {k: v for k, v in orig.items() if isinstance(v, dict)}
    ran_c = {k: v for k, v in comp.items() if isinstance(v, dict)}
    if not ran_o or not ran_c:
        raise ValueError(f"nothing could be measured: original={orig}, compressed={comp}")
    best_o = min(ran_o, key=lambda k: ran_o[k]["median_ms"])
    best_c = min(ran_c, key=lambda k: ran_c[k]["median_ms"])
    same = {k: ran_o[k]["median_ms"] / ran_c[k]["median_ms"] for k in ran_o if k in ran_c}
    env = environment(threads, batch=int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None,
                      input_shape=list(inputs[0].shape), dtype=str(inputs[0].dtype),
                      device=str(inputs[0].device), **env_extra)
    return SpeedComparison(original=orig, compressed=comp, original_best=best_o, compressed_best=best_c,
                           speedup=ran_o[best_o]["median_ms"] / ran_c[best_c]["median_ms"], same_form=same,
                           macs_original=_macs(original, inputs), macs_compressed=_macs(compressed, inputs), env=env)


_FRESH = r"""
import json, sys
import torch
import convfactor
from convfactor import models
from convfactor.measure.allocator import set_malloc
from convfactor.measure.compare import compare_speed
name, directory, shape, threads, repeats, malloc = json.loads(sys.argv[1])
set_malloc(malloc)
original = models.get(name, pretrained=True)
compressed = convfactor.load(directory, models.get(name))
x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
res = compare_speed(original, compressed, x, threads=threads, repeats=repeats, rounds=3)
print("RESULT " + json.dumps(res.to_dict()))
"""


def compare_in_fresh_process(model_name: str, compressed: nn.Module, input_shape, *, threads: int = 2,
                             repeats: int = 9, malloc: str = "default", timeout: float = 900.0) -> dict:
    """:func:`compare_speed` of the zoo model ``model_name`` (shipped weights) against ``compressed``,
    run in a new Python process (so process-wide settings such as the allocator start clean).

    ``compressed`` is saved with :func:`convfactor.save` to a temporary directory and loaded there.
    Returns ``SpeedComparison.to_dict()``.
    """
    import json
    import subprocess
    import sys
    import tempfile

    from ..io import save
    with tempfile.TemporaryDirectory() as tmp:
        save(compressed, f"{tmp}/model")
        arg = json.dumps([model_name, f"{tmp}/model", list(input_shape), threads, repeats, malloc])
        res = subprocess.run([sys.executable, "-c", _FRESH, arg], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"timing in a fresh process failed:\n{res.stderr[-2000:]}")
    line = next(v for v in reversed(res.stdout.splitlines()) if v.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
