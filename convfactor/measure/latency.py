"""Latency measurement on ``torch.utils.benchmark``.

Every figure is a median over repeats after warm-up, with threads set explicitly and
``torch.inference_mode``; the result records what it was measured on.  ``timer`` can be
injected (a function ``(module, inputs) -> seconds``) so planners can be tested deterministically.
"""
from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["Latency", "measure_latency", "environment", "to_memory_format"]


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
           "torch": torch.__version__}
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
