"""Timing back-ends: one small interface for every place that times a model.

A :class:`TimingBackend` turns a model and its example inputs into :class:`Runnable` forms
(``prepare``) and times a form's calls (``time``).  The layer timer, the end-to-end verifier
(:func:`convfactor.measure.compare.compare_speed`), the benchmarks and the demo all time through
it, and every figure records which back-end made it.

* ``torch``: eager PyTorch, one form per memory format (contiguous, channels_last);
* ``compile``: ``torch.compile`` (inductor) per memory format; the compile time is reported
  apart (``Runnable.setup_s``), never inside the timings;
* ``onnxruntime``: the model exported by :func:`convfactor.export.export_model`, run by ONNX
  Runtime's CPU execution provider with all graph optimizations and the thread count set.

CPU calls are timed one call per sample on ``time.perf_counter`` (threads set, after warm-up), or
in ``torch.utils.benchmark.Timer`` blocks with a ``min_run_time``; CUDA calls with CUDA events after a
synchronize, never with the host clock alone.  Hand-written because no library offers one
interface over eager, inductor and ONNX Runtime timing.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..utils import cpu_has, torch_threads

__all__ = ["Runnable", "TimingBackend", "EagerBackend", "CompileBackend", "OnnxRuntimeBackend", "TimerBackend",
           "BACKENDS", "get_backend", "to_memory_format", "sample_ms", "no_grad_call", "FORMS", "prepare_one",
           "form_name"]

#: the memory formats tried when looking for a model's fastest form
FORMS = ("contiguous", "channels_last")
#: how many compiled variants of one forward (one model class) a process may hold
COMPILE_LIMIT = 4096


@dataclass
class Runnable:
    """One prepared form of a model: ``call()`` runs one forward on the fixed ``inputs``."""

    form: str                                  # e.g. "channels_last", "compiled/contiguous", "onnxruntime"
    call: Callable[[], Any]
    module: Any                                # what runs: an nn.Module, a compiled fn or an ORT session
    inputs: tuple
    setup_s: float = 0.0                       # compile / export + session time, apart from the timings
    info: dict = field(default_factory=dict)


def to_memory_format(module: nn.Module, inputs: tuple, memory_format: str) -> tuple[nn.Module, tuple]:
    """``module`` and 4-D/5-D ``inputs`` converted to ``memory_format`` (module converted in place)."""
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}[memory_format]
    module = module.to(memory_format=fmt) if memory_format != "contiguous" else module
    converted = tuple(t.contiguous(memory_format=fmt) if t.dim() in (4, 5) and fmt is not torch.contiguous_format
                      else t for t in inputs)
    return module, converted


def _eager_forms(model: nn.Module, inputs: tuple, memory_formats) -> dict[str, Runnable | str]:
    """Each memory format on its own deep copy (so ``model`` is left as it was)."""
    out: dict[str, Runnable | str] = {}
    for fmt in memory_formats:
        if fmt == "channels_last" and not all(t.dim() == 4 for t in inputs if isinstance(t, torch.Tensor)):
            out[fmt] = "channels_last needs 4-D inputs"
            continue
        m, x = to_memory_format(copy.deepcopy(model).eval(), inputs, fmt)
        out[fmt] = Runnable(fmt, no_grad_call(m, x), m, x)
    return out


def no_grad_call(fn: Callable, inputs: tuple) -> Callable[[], Any]:
    def call():
        with torch.inference_mode():
            return fn(*inputs)
    return call


def _cuda_times(call: Callable, repeats: int) -> list[float]:
    """Milliseconds per call from CUDA events, each bracketed by a synchronize."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(float(start.elapsed_time(end)))
    return times


def _cpu_times(call: Callable, repeats: int, threads: int, min_run_time: float = 0.0) -> list[float]:
    """Milliseconds per call: one call per sample on ``time.perf_counter``, or the median of a
    ``torch.utils.benchmark.Timer.blocked_autorange(min_run_time)`` block per sample.

    Single calls are not sampled with ``Timer.timeit(1)``: it runs two untimed warm-up calls before
    every sample, so each sample cost three forwards (measured on the planner at 256x256: 3744 calls
    for 1872 samples).  The caller has already warmed up and set the threads."""
    if min_run_time:
        import torch.utils.benchmark as benchmark
        timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
        return [timer.blocked_autorange(min_run_time=min_run_time).median * 1e3 for _ in range(repeats)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def sample_ms(call: Callable, inputs: tuple, *, repeats: int, warmup: int, threads: int | None = None,
              min_run_time: float = 0.0) -> list[float]:
    """Milliseconds per ``call()`` over ``repeats`` samples after ``warmup`` calls, threads set; CUDA
    inputs are timed with CUDA events."""
    with torch_threads(threads) as n:
        for _ in range(warmup):
            call()
        if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            return _cuda_times(call, repeats)
        return _cpu_times(call, repeats, n, min_run_time)


class TimingBackend(ABC):
    """Prepare a model's forms, then time them.  Subclasses set ``name`` and implement ``prepare``."""

    name: ClassVar[str] = ""

    @abstractmethod
    def prepare(self, model: nn.Module, inputs: tuple) -> dict[str, Runnable | str]:
        """``form -> Runnable``, or ``form -> reason`` (str) for a form that cannot run here."""

    def channel_multiple(self) -> int | None:
        """Channel count the back-end's fast kernels are blocked by (factor ranks are rounded to it), or
        None when any count runs alike."""
        return None

    def time(self, runnable: Runnable, *, repeats: int, warmup: int, threads: int | None = None,
             min_run_time: float = 0.0) -> list[float]:
        """Milliseconds per call of ``runnable`` over ``repeats`` samples after ``warmup`` calls."""
        return sample_ms(runnable.call, runnable.inputs, repeats=repeats, warmup=warmup, threads=threads,
                         min_run_time=min_run_time)


@dataclass
class EagerBackend(TimingBackend):
    """Eager PyTorch in each memory format."""

    memory_formats: tuple[str, ...] = FORMS
    name: ClassVar[str] = "torch"

    def prepare(self, model, inputs):
        return _eager_forms(model, inputs, self.memory_formats)


@dataclass
class CompileBackend(TimingBackend):
    """``torch.compile`` of each memory format's copy; a form whose compilation fails maps to the reason."""

    memory_formats: tuple[str, ...] = FORMS
    options: dict = field(default_factory=dict)
    name: ClassVar[str] = "compile"

    def prepare(self, model, inputs):
        out: dict[str, Runnable | str] = {}
        for fmt, eager in _eager_forms(model, inputs, self.memory_formats).items():
            key = f"compiled/{fmt}"
            if isinstance(eager, str):
                out[key] = eager
                continue
            t0 = time.perf_counter()
            try:
                # Every model of one class shares its forward's code object, and dynamo stops compiling it
                # after ``recompile_limit`` (8) variants, silently running eager from then on (a planner's
                # checks compile many); raise the limit while compiling, and fail rather than fall back.
                with torch._dynamo.config.patch(recompile_limit=COMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                    fn = torch.compile(eager.module, **self.options)
                    no_grad_call(fn, eager.inputs)()           # the first call compiles
            except Exception as exc:  # noqa: BLE001 - any inductor failure means "not available here"
                out[key] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                continue
            out[key] = Runnable(key, no_grad_call(fn, eager.inputs), fn, eager.inputs,
                                setup_s=time.perf_counter() - t0)
        return out


@dataclass
class OnnxRuntimeBackend(TimingBackend):
    """ONNX Runtime, CPU execution provider, all graph optimizations, ``threads`` intra-op threads."""

    threads: int | None = None
    opset: int = 17
    name: ClassVar[str] = "onnxruntime"

    def __post_init__(self):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ValueError("the onnxruntime back-end needs the onnxruntime package (a dependency of "
                             "convfactor: pip install onnxruntime)") from exc

    def channel_multiple(self) -> int:
        """ONNX Runtime's CPU convs run in a blocked NCHWc layout whose block is 16 channels with AVX-512
        and 8 otherwise; a conv whose channels are not a multiple falls back to NCHW, with layout
        reorders around it.  Measured 2026-12-02 (EDSR x2 at 256x256, 2 threads, every body conv by
        spatial SVD): rank 11 ran 2.28x faster than dense at 4.65x fewer MACs, rank 16 2.71x at 3.83x
        fewer (reorders 51 ms of 252 at rank 11)."""
        return 16 if cpu_has("avx512f") else 8

    def prepare(self, model, inputs):
        from ..export import export_model, ort_session
        if len(inputs) != 1:
            return {"onnxruntime": "the onnxruntime back-end takes models with one input tensor"}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(copy.deepcopy(model).eval(), inputs[0], os.path.join(tmp, "model.onnx"),
                                opset=self.opset)
            session = ort_session(path, self.threads)
        feeds = {session.get_inputs()[0].name: inputs[0].detach().cpu().numpy()}
        threads = session.get_session_options().intra_op_num_threads
        return {"onnxruntime": Runnable("onnxruntime", lambda: session.run(None, feeds), session, inputs,
                                        setup_s=time.perf_counter() - t0,
                                        info={"intra_op_threads": threads, "opset": self.opset})}


@dataclass
class TimerBackend(TimingBackend):
    """Another back-end's forms timed by an injected ``timer(module, inputs) -> seconds`` (for tests:
    a deterministic or deliberately noisy clock).  Compilation and export are skipped."""

    timer: Callable[[Any, tuple], float]
    inner: TimingBackend = field(default_factory=EagerBackend)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def prepare(self, model, inputs):
        if isinstance(self.inner, CompileBackend):          # a fake clock needs no real compilation
            forms = _eager_forms(model, inputs, self.inner.memory_formats)
            return {f"compiled/{k}": (replace(v, form=f"compiled/{k}") if isinstance(v, Runnable) else v)
                    for k, v in forms.items()}
        if isinstance(self.inner, OnnxRuntimeBackend):
            forms = _eager_forms(model, inputs, ("contiguous",))
            return {"onnxruntime": replace(forms["contiguous"], form="onnxruntime")}
        return self.inner.prepare(model, inputs)

    def channel_multiple(self) -> int | None:
        return self.inner.channel_multiple()

    def time(self, runnable, *, repeats, warmup, threads=None, min_run_time=0.0):
        return [float(self.timer(runnable.module, runnable.inputs)) * 1e3 for _ in range(repeats)]


def form_name(backend: TimingBackend, memory_format: str) -> str:
    """The form key ``backend.prepare`` gives a model in ``memory_format``."""
    kind = backend.inner if isinstance(backend, TimerBackend) else backend
    if isinstance(kind, OnnxRuntimeBackend):
        return "onnxruntime"
    return f"compiled/{memory_format}" if isinstance(kind, CompileBackend) else memory_format


def prepare_one(backend: TimingBackend, module: nn.Module, inputs: tuple, memory_format: str = "contiguous"
                ) -> Runnable:
    """``module`` prepared by ``backend`` in one memory format (onnxruntime has only its own form);
    raises ValueError with the reason when that form cannot run.  A channels-last request on inputs that
    have no channels-last layout (not 4-D) times the contiguous form, as converting them would."""
    if memory_format == "channels_last" and not all(t.dim() == 4 for t in inputs if isinstance(t, torch.Tensor)):
        memory_format = "contiguous"
    kind = backend.inner if isinstance(backend, TimerBackend) else backend
    if isinstance(kind, (EagerBackend, CompileBackend)):
        kind = replace(kind, memory_formats=(memory_format,))
    target = TimerBackend(backend.timer, kind) if isinstance(backend, TimerBackend) else kind
    form = target.prepare(module, inputs)[form_name(backend, memory_format)]
    if isinstance(form, str):
        raise ValueError(f"cannot time {type(module).__name__} with the {backend.name} back-end: {form}")
    return form


BACKENDS: dict[str, type[TimingBackend]] = {"torch": EagerBackend, "compile": CompileBackend,
                                            "onnxruntime": OnnxRuntimeBackend}


def get_backend(backend: str | TimingBackend = "torch", *, timer: Callable | None = None,
                **options) -> TimingBackend:
    """The back-end called ``backend`` configured by ``options`` (an instance is returned as is);
    with ``timer``, its forms are timed by that clock instead (tests)."""
    if isinstance(backend, TimingBackend):
        chosen = backend
    elif backend in BACKENDS:
        fields = getattr(BACKENDS[backend], "__dataclass_fields__", {})
        chosen = BACKENDS[backend](**{k: v for k, v in options.items() if k in fields})
    else:
        raise ValueError(f"unknown timing back-end {backend!r}; known: {', '.join(BACKENDS)}")
    return TimerBackend(timer, chosen) if timer is not None else chosen
