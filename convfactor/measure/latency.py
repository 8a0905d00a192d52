"""Latency measurement on ``torch.utils.benchmark``, through the timing back-ends of :mod:`.backends`.

Every figure is a median over repeats after warm-up, with threads set explicitly and
``torch.inference_mode``; the result records what it was measured on.  ``timer`` can be
injected (a function ``(module, inputs) -> seconds``) so planners can be tested deterministically.

:func:`measure_forms` times one module in several *forms* (memory format x eager/``torch.compile``);
``torch.utils.benchmark.Timer`` synchronizes CUDA itself, so GPU timings are honest too.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..utils import as_inputs, torch_threads
from .allocator import malloc_setting
from .backends import FORMS, CompileBackend, EagerBackend, get_backend, no_grad_call, sample_ms, to_memory_format

__all__ = ["Latency", "measure_latency", "measure_forms", "environment", "to_memory_format", "fastest",
           "FORMS", "latency_of", "burn_in"]


@dataclass
class Latency:
    median_ms: float
    iqr_ms: float
    times_ms: list[float] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def environment(threads: int | None = None, **extra) -> dict:
    """Device, CPU model, threads and torch version, plus ``extra`` (batch, input size, ...)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {"device": "cpu", "cpu": cpu, "threads": threads or torch.get_num_threads(),
           "torch": str(torch.__version__), "malloc": malloc_setting()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    env.update(extra)
    return env


def measure_latency(module: nn.Module | Callable, inputs, *, threads: int | None = None, repeats: int = 15,
                    warmup: int = 3, min_run_time: float = 0.0, memory_format: str = "contiguous",
                    timer: Callable | None = None, **env_extra) -> Latency:
    """Median and IQR (ms) of ``module(*inputs)`` over ``repeats`` timed blocks after ``warmup`` calls."""
    inputs = as_inputs(inputs)
    if isinstance(module, nn.Module):
        module.eval()
        module, inputs = to_memory_format(module, inputs, memory_format)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    env_extra.setdefault("device", str(tensors[0].device) if tensors else "cpu")
    env = environment(threads, memory_format=memory_format, input_shape=[list(t.shape) for t in tensors],
                      dtype=str(tensors[0].dtype if tensors else None), **env_extra)
    if timer is not None:
        times = [float(timer(module, inputs)) * 1e3 for _ in range(repeats)]
    else:
        times = sample_ms(no_grad_call(module, inputs), inputs, repeats=repeats, warmup=warmup, threads=threads,
                          min_run_time=min_run_time)
    return latency_of(times, env)


def latency_of(times: list[float], env: dict) -> Latency:
    """Median and interquartile range of ``times`` (ms)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Latency(median_ms=statistics.median(times), iqr_ms=q[2] - q[0], times_ms=list(times), env=env)


def measure_forms(module: nn.Module, inputs, *, memory_formats=FORMS, compile: bool = False,
                  threads: int | None = None, repeats: int = 15, warmup: int = 3, min_run_time: float = 0.0,
                  timer: Callable | None = None, **env_extra) -> dict[str, Latency | str]:
    """Latency of ``module`` in each form: ``'contiguous'``, ``'channels_last'`` and, with
    ``compile=True``, ``'compiled/contiguous'`` etc.  A form that cannot run maps to a reason (str).

    Each form uses its own copy of the module, so ``module`` itself is left as it was.
    """
    inputs = as_inputs(inputs)
    backends = [EagerBackend(tuple(memory_formats))] + ([CompileBackend(tuple(memory_formats))] if compile else [])
    out: dict[str, Latency | str] = {}
    for backend in backends:
        backend = get_backend(backend, timer=timer)
        with torch_threads(threads):
            forms = backend.prepare(module, inputs)
        for key, form in forms.items():
            if isinstance(form, str):
                out[key] = form
                continue
            times = backend.time(form, repeats=repeats, warmup=warmup, threads=threads, min_run_time=min_run_time)
            env = environment(threads, memory_format=key.split("/")[-1], compiled=key.startswith("compiled/"),
                              backend=backend.name, **env_extra)
            out[key] = latency_of(times, env)
    return out


def fastest(forms: dict[str, Latency | str]) -> tuple[str, Latency]:
    """The form with the lowest median among those that ran."""
    ran = {k: v for k, v in forms.items() if isinstance(v, Latency)}
    if not ran:
        raise ValueError(f"no form could be measured: {forms}")
    key = min(ran, key=lambda k: ran[k].median_ms)
    return key, ran[key]


def burn_in(seconds: float = 3.0, threads: int | None = None) -> None:
    """Keep the CPU busy with dense GEMMs for ``seconds`` before timing.

    On the shared 2-vCPU machines here the first ~0.5 s of work after idling runs up to 10x slower
    (measured: a 512-channel 3x3 conv at 32 ms, then 3.1 ms); a burn-in removes that from the figures.
    """
    with torch_threads(threads):
        a = torch.randn(512, 512)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)
