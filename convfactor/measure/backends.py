"""Timing back-ends: one small interface for every place that times a model.

A :class:`TimingBackend` turns a model and its example inputs into :class:`Runnable` forms
(``prepare``) and times a form's calls (``time``).  The layer timer, the end-to-end verifier
(:func:`convfactor.measure.compare.compare_speed`), the benchmarks and the demo all time through
it, and every figure records which back-end made it.

* ``torch``: eager PyTorch, one form per memory format (contiguous, channels_last);
* ``compile``: ``torch.compile`` (inductor) per memory format; the compile time is reported
  apart (``Runnable.setup_s``), never inside the timings;
* ``onnxruntime``: the model exported by :func:`convfactor.export.export_model`, run by ONNX
  Runtime's CPU execution provider with all graph optimizations and the thread count set;
* ``openvino``: the same ONNX file compiled by OpenVINO's CPU plugin (:mod:`.openvino`).

A back-end is configured like a method, ``name:key=value`` (``openvino:precision=bf16``,
``onnxruntime:precision=int8``, ``torch:precision=bf16``): :func:`get_backend` resolves the name once
into the object, which owns its forms (:meth:`TimingBackend.form_for`), its channel block, its
precision and what every figure records of it (:meth:`TimingBackend.describe`).  A precision the
back-end or the CPU cannot run is refused with one line.  A new runtime is one module with a
:class:`TimingBackend` subclass plus one line in :data:`BACKENDS`; ``tests/measure/test_backend_contract.py``
then covers it.

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

from ..utils import BF16_FLAGS, bf16_problem, cpu_has, parse_configured, torch_threads

__all__ = ["Runnable", "TimingBackend", "EagerBackend", "CompileBackend", "OnnxRuntimeBackend", "TimerBackend",
           "BACKENDS", "get_backend", "to_memory_format", "sample_ms", "no_grad_call", "FORMS", "prepare_one",
           "form_name", "backend_class", "check_backend_name", "BF16_FLAGS"]


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
    """Prepare a model's forms, then time them.  Subclasses set ``name`` and implement ``prepare``;
    a subclass with several precisions lists them in ``precisions`` and has a ``precision`` field."""

    name: ClassVar[str] = ""
    #: the precisions this back-end runs (the first is the default)
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    #: True when the back-end has one layout of its own whatever memory format is asked for
    own_layout: ClassVar[bool] = False
    #: the ``name:key=value`` options a configured back-end takes from a string
    string_options: ClassVar[tuple[str, ...]] = ("precision",)

    @abstractmethod
    def prepare(self, model: nn.Module, inputs: tuple) -> dict[str, Runnable | str]:
        """``form -> Runnable``, or ``form -> reason`` (str) for a form that cannot run here."""

    @property
    def precision_in_use(self) -> str:
        return getattr(self, "precision", self.precisions[0])

    @property
    def key(self) -> str:
        """How the configured back-end is named: ``openvino``, ``openvino:precision=bf16``."""
        p = self.precision_in_use
        return self.name + ("" if p == self.precisions[0] else f":precision={p}")

    def check_precision(self) -> None:
        """A one-line ValueError when this back-end or this CPU cannot run the precision natively."""
        p = self.precision_in_use
        if p not in self.precisions:
            raise ValueError(f"the {self.name} back-end runs precision {', '.join(self.precisions)}, not {p!r}")
        problem = bf16_problem() if p == "bf16" else None
        if problem:
            raise ValueError(f"{self.name}:precision={problem}")

    def form_for(self, memory_format: str) -> str:
        """The form key :meth:`prepare` gives a model in ``memory_format``."""
        if self.own_layout:
            return self.key
        p = self.precision_in_use
        return memory_format if p == self.precisions[0] else f"{memory_format}@{p}"

    def layouts(self, memory_formats) -> tuple[str, ...]:
        """The memory formats worth trying on this back-end (one for a back-end with its own layout)."""
        return ("contiguous",) if self.own_layout else tuple(memory_formats)

    def runtime_version(self) -> str:
        return f"torch {torch.__version__}"

    def deployed(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """``model`` as this back-end serves it, behind an ``nn.Module`` face taking images of any size
        (one tensor in, the first output out, float32): quality is measured through the runtime itself,
        at its precision.  Eager fp32 (and compile, numerically the same) returns ``model``."""
        return model

    def output(self, runnable: Runnable) -> torch.Tensor:
        """One call of ``runnable``, its first output as a float32 CPU tensor (quality through the runtime)."""
        out = runnable.call()
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().cpu()

    def describe(self) -> dict:
        """What every figure this back-end makes records of it."""
        return {"backend": self.key, "precision": self.precision_in_use, "runtime": self.runtime_version()}

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
    """Eager PyTorch in each memory format; ``precision='bf16'`` runs under CPU autocast to bfloat16."""

    memory_formats: tuple[str, ...] = FORMS
    precision: str = "fp32"
    name: ClassVar[str] = "torch"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")

    def __post_init__(self):
        self.check_precision()

    def deployed(self, model, example):
        return model if self.precision == "fp32" else AutocastBF16(model)

    def prepare(self, model, inputs):
        forms = _eager_forms(model, inputs, self.memory_formats)
        if self.precision == "fp32":
            return forms
        return {self.form_for(k): (replace(v, form=self.form_for(k), call=_autocast_call(v.module, v.inputs))
                                   if isinstance(v, Runnable) else v) for k, v in forms.items()}


class AutocastBF16(nn.Module):
    """``model`` run under CPU autocast to bfloat16, its output returned as float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def _autocast_call(module: nn.Module, inputs: tuple) -> Callable[[], Any]:
    def call():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*inputs)
    return call


@dataclass
class CompileBackend(TimingBackend):
    """``torch.compile`` of each memory format's copy; a form whose compilation fails maps to the reason."""

    memory_formats: tuple[str, ...] = FORMS
    options: dict = field(default_factory=dict)
    name: ClassVar[str] = "compile"

    def form_for(self, memory_format: str) -> str:
        return f"compiled/{memory_format}"

    def prepare(self, model, inputs):
        out: dict[str, Runnable | str] = {}
        for fmt, eager in _eager_forms(model, inputs, self.memory_formats).items():
            key = self.form_for(fmt)
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
    precision: str = "fp32"
    #: input arrays int8 is calibrated on (default: the example input alone, which is enough for timing)
    calibration: tuple = ()
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    own_layout: ClassVar[bool] = True

    def __post_init__(self):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ValueError("the onnxruntime back-end needs the onnxruntime package (a dependency of "
                             "convfactor: pip install onnxruntime)") from exc
        self.check_precision()

    def runtime_version(self) -> str:
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"

    def output(self, runnable: Runnable) -> torch.Tensor:
        return torch.from_numpy(runnable.call()[0].copy()).float()

    def deployed(self, model, example):
        """The ONNX file (height and width dynamic; int8-quantized at ``precision='int8'``, calibrated on
        ``calibration`` or the example) served by ONNX Runtime."""
        from ..export import OnnxModule
        with tempfile.TemporaryDirectory() as tmp:
            return OnnxModule(self._onnx_file(model, example, tmp, dynamic_spatial=True), self.threads)

    def _onnx_file(self, model: nn.Module, example: torch.Tensor, folder: str, dynamic_spatial: bool = False) -> str:
        """``model`` exported into ``folder`` at this back-end's opset, int8-quantized at
        ``precision='int8'`` (calibrated on ``calibration``, default the example alone); the file's path."""
        from ..export import export_model
        path = str(export_model(copy.deepcopy(model).eval(), example, os.path.join(folder, "model.onnx"),
                                opset=self.opset, dynamic_spatial=dynamic_spatial, log=lambda _: None))
        if self.precision == "int8":
            from ..quantize import quantize_int8
            data = list(self.calibration) or [example.detach().cpu().numpy()]
            quantize_int8(path, os.path.join(folder, "int8.onnx"), data)
            path = os.path.join(folder, "int8.onnx")
        return path

    def channel_multiple(self) -> int:
        """ONNX Runtime's CPU convs run in a blocked NCHWc layout whose block is 16 channels with AVX-512
        and 8 otherwise; a conv whose channels are not a multiple falls back to NCHW, with layout
        reorders around it.  Measured 2026-12-02 (EDSR x2 at 256x256, 2 threads, every body conv by
        spatial SVD): rank 11 ran 2.28x faster than dense at 4.65x fewer MACs, rank 16 2.71x at 3.83x
        fewer (reorders 51 ms of 252 at rank 11)."""
        return 16 if cpu_has("avx512f") else 8

    def prepare(self, model, inputs):
        from ..export import ort_session
        if len(inputs) != 1:
            return {self.key: "the onnxruntime back-end takes models with one input tensor"}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            session = ort_session(self._onnx_file(model, inputs[0], tmp), self.threads)
        feeds = {session.get_inputs()[0].name: inputs[0].detach().cpu().numpy()}
        threads = session.get_session_options().intra_op_num_threads
        return {self.key: Runnable(self.key, lambda: session.run(None, feeds), session, inputs,
                                   setup_s=time.perf_counter() - t0,
                                   info={"intra_op_threads": threads, "opset": self.opset, **self.describe()})}


@dataclass
class TimerBackend(TimingBackend):
    """Another back-end's forms timed by an injected ``timer(module, inputs) -> seconds`` (for tests:
    a deterministic or deliberately noisy clock).  Compilation and export are skipped."""

    timer: Callable[[Any, tuple], float]
    inner: TimingBackend = field(default_factory=EagerBackend)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def key(self) -> str:  # type: ignore[override]
        return self.inner.key

    def form_for(self, memory_format: str) -> str:
        return self.inner.form_for(memory_format)

    def layouts(self, memory_formats) -> tuple[str, ...]:
        return self.inner.layouts(memory_formats)

    def describe(self) -> dict:
        return {**self.inner.describe(), "clock": "injected"}

    def prepare(self, model, inputs):
        """The inner back-end's form keys over eager forms: a fake clock needs no compilation or export."""
        formats = self.inner.layouts(getattr(self.inner, "memory_formats", FORMS))
        forms = _eager_forms(model, inputs, formats)
        return {self.inner.form_for(k): (replace(v, form=self.inner.form_for(k)) if isinstance(v, Runnable) else v)
                for k, v in forms.items()}

    def channel_multiple(self) -> int | None:
        return self.inner.channel_multiple()

    def time(self, runnable, *, repeats, warmup, threads=None, min_run_time=0.0):
        return [float(self.timer(runnable.module, runnable.inputs)) * 1e3 for _ in range(repeats)]


def form_name(backend: TimingBackend, memory_format: str) -> str:
    """The form key ``backend.prepare`` gives a model in ``memory_format``."""
    return backend.form_for(memory_format)


def prepare_one(backend: TimingBackend, module: nn.Module, inputs: tuple, memory_format: str = "contiguous"
                ) -> Runnable:
    """``module`` prepared by ``backend`` in one memory format (a back-end with its own layout has only
    its own form); raises ValueError with the reason when that form cannot run.  A channels-last request
    on inputs that have no channels-last layout (not 4-D) times the contiguous form, as converting them
    would."""
    if memory_format == "channels_last" and not all(t.dim() == 4 for t in inputs if isinstance(t, torch.Tensor)):
        memory_format = "contiguous"
    kind = backend.inner if isinstance(backend, TimerBackend) else backend
    if hasattr(kind, "memory_formats"):
        kind = replace(kind, memory_formats=(memory_format,))
    target = TimerBackend(backend.timer, kind) if isinstance(backend, TimerBackend) else kind
    form = target.prepare(module, inputs)[backend.form_for(memory_format)]
    if isinstance(form, str):
        raise ValueError(f"cannot time {type(module).__name__} with the {backend.key} back-end: {form}")
    return form


#: back-end name -> its class, or "module:Class" (relative to convfactor.measure) loaded on first use
BACKENDS: dict[str, type[TimingBackend] | str] = {"torch": EagerBackend, "compile": CompileBackend,
                                                  "onnxruntime": OnnxRuntimeBackend,
                                                  "openvino": "openvino_backend:OpenVinoBackend"}


def backend_class(name: str) -> type[TimingBackend]:
    """The class registered as ``name`` (imported on first use); an unknown name is one ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"unknown timing back-end {name!r}; known: {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if isinstance(entry, str):
        import importlib
        module, cls = entry.split(":")
        entry = BACKENDS[name] = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return entry


def check_backend_name(text: str) -> None:
    """A one-line ValueError unless ``text`` names a registered back-end with options it takes and a
    precision it runs (the CPU's support is checked when the back-end is built)."""
    name, given = parse_configured(text, what="back-end")
    cls = backend_class(name)
    unknown = sorted(set(given) - set(cls.string_options))
    if unknown:
        raise ValueError(f"back-end {text!r}: unknown option(s) {unknown}; known: {', '.join(cls.string_options)}")
    if "precision" in given and given["precision"] not in cls.precisions:
        raise ValueError(f"the {name} back-end runs precision {', '.join(cls.precisions)}, not {given['precision']!r}")


def fp32_of(backend: str) -> str | None:
    """``'openvino'`` for ``'openvino:precision=bf16'``: the same runtime in its default precision, for a
    back-end configured at another one; None for a back-end at its default precision."""
    name, options = parse_configured(backend, what="back-end")
    return name if options.get("precision", "fp32") != "fp32" else None


def get_backend(backend: str | TimingBackend = "torch", *, timer: Callable | None = None,
                **options) -> TimingBackend:
    """The back-end ``backend`` (a name, or ``name:key=value,...`` such as ``openvino:precision=bf16``)
    configured by ``options`` (those that are not its fields are ignored); an instance is returned as
    is.  With ``timer``, its forms are timed by that clock instead (tests).  An unknown name, option or
    precision is one ValueError line."""
    if isinstance(backend, TimingBackend):
        chosen = backend
    else:
        check_backend_name(backend)
        name, given = parse_configured(backend, what="back-end")
        cls = backend_class(name)
        fields = getattr(cls, "__dataclass_fields__", {})
        chosen = cls(**{k: v for k, v in {**options, **given}.items() if k in fields})
    return TimerBackend(timer, chosen) if timer is not None else chosen
