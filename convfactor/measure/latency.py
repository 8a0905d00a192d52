"""Latency measurement on ``torch.utils.benchmark``.

Every figure is a median over repeats after warm-up, with threads set explicitly and
``torch.inference_mode``; the result records what it was measured on.  ``timer`` can be
injected (a function ``(module, inputs) -> seconds``) so planners can be tested deterministically.

:func:`measure_forms` times one module in several *forms* (memory format x eager/``torch.compile``);
``torch.utils.benchmark.Timer`` synchronizes CUDA itself, so GPU timings are honest too.
"""
from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["Latency", "measure_latency", "measure_forms", "environment", "to_memory_format", "compiled", "fastest", "FORMS"]

#: the memory formats tried when looking for a model's fastest form
FORMS = ("contiguous", "channels_last")


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
    from .allocator import malloc_setting
    env = {"device": "cpu", "cpu": cpu, "threads": threads or torch.get_num_threads(),
           "torch": str(torch.__version__), "malloc": malloc_setting()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    env.update(extra)
    return env


def to_memory_format(module: nn.Module, inputs: tuple, memory_format: str) -> tuple[nn.Module, tuple]:
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}[memory_format]
    module = module.to(memory_format=fmt) if memory_format != "contiguous" else module
    converted = tuple(t.contiguous(memory_format=fmt) if t.dim() in (4, 5) and fmt is not torch.contiguous_format
                      else t for t in inputs)
    return module, converted


def measure_latency(module: nn.Module | Callable, inputs, *, threads: int | None = None, repeats: int = 15,
                    warmup: int = 3, min_run_time: float = 0.0, memory_format: str = "contiguous",
                    timer: Callable | None = None, **env_extra) -> Latency:
    """Median and IQR (ms) of ``module(*inputs)`` over ``repeats`` timed blocks after ``warmup`` calls."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(module, nn.Module):
        module.eval()
        module, inputs = to_memory_format(module, inputs, memory_format)
    device = next((str(t.device) for t in inputs if isinstance(t, torch.Tensor)), "cpu")
    env_extra.setdefault("device", device)
    env = environment(threads, memory_format=memory_format,
                      input_shape=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
                      dtype=str(next((t.dtype for t in inputs if isinstance(t, torch.Tensor)), None)), **env_extra)
    if timer is not None:
        times = [float(timer(module, inputs)) * 1e3 for _ in range(repeats)]
    else:
        import torch.utils.benchmark as benchmark
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    module(*inputs)
                t = benchmark.Timer(stmt="module(*inputs)", globals={"module": module, "inputs": inputs},
                                    num_threads=threads or torch.get_num_threads())
                times = []
                for _ in range(repeats):
                    m = t.blocked_autorange(min_run_time=min_run_time) if min_run_time else t.timeit(1)
                    times.append(m.median * 1e3)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
        finally:
            torch.set_num_threads(previous)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Latency(median_ms=statistics.median(times), iqr_ms=q[2] - q[0], times_ms=times, env=env)


def compiled(module: nn.Module, inputs: tuple, **compile_options) -> tuple[nn.Module | None, str | None]:
    """``(torch.compile(module), None)`` after one successful call, or ``(None, reason)``.

    The first call compiles (seconds to tens of seconds on CPU); a failure is returned as a
    reason rather than raised, so callers can report "torch.compile: unavailable (why)".
    """
    try:
        fn = torch.compile(module, **compile_options)
        with torch.inference_mode():
            fn(*inputs)
        return fn, None
    except Exception as exc:  # noqa: BLE001 - any backend failure means "not available here"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def measure_forms(module: nn.Module, inputs, *, memory_formats=FORMS, compile: bool = False,
                  threads: int | None = None, repeats: int = 15, warmup: int = 3, min_run_time: float = 0.0,
                  timer: Callable | None = None, **env_extra) -> dict[str, Latency | str]:
    """Latency of ``module`` in each form: ``'contiguous'``, ``'channels_last'`` and, with
    ``compile=True``, ``'compiled/contiguous'`` etc.  A form that cannot run maps to a reason (str).

    Each form uses its own copy of the module, so ``module`` itself is left as it was.
    """
    import copy
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    out: dict[str, Latency | str] = {}
    for fmt in memory_formats:
        if fmt == "channels_last" and not all(t.dim() == 4 for t in inputs if isinstance(t, torch.Tensor)):
            out[fmt] = "channels_last needs 4-D inputs"
            continue
        m, x = to_memory_format(copy.deepcopy(module).eval(), inputs, fmt)
        out[fmt] = measure_latency(m, x, threads=threads, repeats=repeats, warmup=warmup, min_run_time=min_run_time,
                                   memory_format=fmt, timer=timer, compiled=False, **env_extra)
        if compile:
            if timer is not None:
                fn, why = m, None          # a fake timer needs no real compilation
            else:
                previous = torch.get_num_threads()
                if threads:
                    torch.set_num_threads(threads)
                try:
                    fn, why = compiled(m, x)
                finally:
                    torch.set_num_threads(previous)
            key = f"compiled/{fmt}"
            if fn is None:
                out[key] = f"torch.compile failed: {why}"
                continue
            # fn is already in ``fmt``; measure_latency must not convert it again
            lat = measure_latency(fn, x, threads=threads, repeats=repeats, warmup=warmup,
                                  min_run_time=min_run_time, timer=timer, compiled=True, **env_extra)
            lat.env["memory_format"] = fmt
            out[key] = lat
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
    import time
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(512, 512)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            a = torch.tanh(a @ a)
    finally:
        torch.set_num_threads(previous)
