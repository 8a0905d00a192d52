"""OpenVINO as a deploy runtime: IR export, compiled models at a precision, NNCF int8, and a module face.

OpenVINO (Intel's inference runtime, PyPI ``openvino``) is the fastest CPU runtime measured here for
both the dense and the factorized models (issue 21): its CPU plugin runs convs in blocked layouts
(16 channels with AVX-512, 8 with AVX2) and fuses the element-wise ops around them.  Everything
numerical is OpenVINO's or NNCF's; this module only configures them as convfactor times and serves
a model:

- the graph is read from the ONNX file :func:`convfactor.export.export_model` writes (the same one
  ONNX Runtime runs), so every runtime sees the same factorized graph;
- ``PERFORMANCE_HINT=LATENCY`` (one stream), ``INFERENCE_NUM_THREADS`` set, and the precision as
  ``INFERENCE_PRECISION_HINT`` (``f32`` or ``bf16``; bf16 only where the CPU runs it natively:
  AVX512-BF16 or AMX, see :func:`precision_problem`);
- int8 is NNCF's post-training quantization (``nncf.quantize``) calibrated on the inputs given, with
  the image-facing convs (4 channels or fewer on either side) kept in float, as in
  :mod:`convfactor.quantize`.

**The preloaded-allocator abort.**  In a process with tcmalloc or jemalloc in ``LD_PRELOAD`` (what
the CLI's ``--malloc auto`` sets up), compiling a model aborted with ``free(): invalid pointer`` /
``munmap_chunk(): invalid pointer``.  The cause is oneTBB, OpenVINO's threading library: it
``dlopen``s ``libtbbbind`` with ``RTLD_DEEPBIND``, so hwloc inside it binds ``free`` to glibc's
while the libc functions it calls (``asprintf``, ...) allocate with the preloaded ``malloc``; the
first ``free`` of such a block aborts (oneTBB issue #1636).  oneTBB skips ``RTLD_DEEPBIND`` when
``TBB_ENABLE_SANITIZERS=1``; :func:`openvino` sets it (unless the user set it) before OpenVINO loads
that library, which happens at the first compile.  Verified here with both allocators preloaded.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .files import check_output, temporary_sibling_dir
from .utils import BF16_FLAGS, bf16_problem

__all__ = ["openvino", "precision_problem", "compile_model", "read_onnx", "quantize_nncf", "export_ir",
           "OpenVinoModule", "version", "PRECISIONS", "BF16_FLAGS", "TBB_SAFE_ENV"]

PRECISIONS = ("fp32", "bf16", "int8")
#: oneTBB loads tbbbind without RTLD_DEEPBIND with this set (see the module docstring)
TBB_SAFE_ENV = ("TBB_ENABLE_SANITIZERS", "1")


def openvino():
    """The ``openvino`` module, made safe under a preloaded allocator; a one-line error when missing."""
    key, value = TBB_SAFE_ENV
    os.environ.setdefault(key, value)
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("the openvino back-end needs the openvino package: pip install openvino") from None
    if os.environ.get(key) != value and any(n in os.environ.get("LD_PRELOAD", "") for n in ("tcmalloc", "jemalloc")):
        raise ValueError(f"OpenVINO aborts under a preloaded tcmalloc/jemalloc unless {key}={value} "
                         f"(it is {os.environ.get(key)!r} here); unset it or run with --malloc default")
    return ov


def version() -> str:
    """OpenVINO's version string (recorded with every figure it makes)."""
    return str(openvino().__version__).split("-")[0]


def precision_problem(precision: str) -> str | None:
    """Why ``precision`` cannot run natively on this CPU, or None when it can."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}"
    return bf16_problem() if precision == "bf16" else None


def read_onnx(path: str | os.PathLike):
    """The OpenVINO model of an ONNX file (``ov.Model``)."""
    return openvino().Core().read_model(str(path))


def compile_model(model: Any, *, threads: int | None = None, precision: str = "fp32"):
    """``model`` (an ``ov.Model`` or a file OpenVINO reads) compiled for the CPU as convfactor times and
    serves it: LATENCY hint, ``threads`` inference threads (default: torch's), the precision hint (an
    int8 model's quantized ops run in int8 whatever the hint; its other ops in f32)."""
    problem = precision_problem(precision)
    if problem:
        raise ValueError(problem)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    model = str(model) if isinstance(model, (str, os.PathLike)) else model
    return openvino().Core().compile_model(model, "CPU", config)


def image_facing_convs(ov_model, max_channels: int = 4) -> list[str]:
    """Names of the Convolution ops of ``ov_model`` that read or write the image itself: those the input
    reaches, or that reach an output, through no other Convolution (a mean shift, a PixelShuffle, a
    residual add or a merge's bias field between them and the image changes nothing: EDSR's upsampler
    merged with its tail is a 44->12 conv whose channels are the image's sub-pixels), and those whose
    weight has ``max_channels`` or fewer output or input channels."""
    names = set(_convs_reached(ov_model.get_parameters(), _consumers))
    names |= _convs_reached(ov_model.get_results(), _producers)
    for op in ov_model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        shape = op.input(1).get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() >= 2 and shape[0].is_static and shape[1].is_static:
            if min(shape[0].get_length(), shape[1].get_length()) <= max_channels:
                names.add(op.get_friendly_name())
    return sorted(names)


def _consumers(node) -> list:
    return [target.get_node() for out in node.outputs() for target in out.get_target_inputs()]


def _producers(node) -> list:
    return [inp.get_source_output().get_node() for inp in node.inputs()]


def _convs_reached(start, step) -> set[str]:
    """Friendly names of the Convolutions reached from ``start`` by ``step`` (consumers or producers)
    without passing through another Convolution."""
    found, seen, stack = set(), set(), list(start)
    while stack:
        node = stack.pop()
        key = node.get_friendly_name()
        if key in seen:
            continue
        seen.add(key)
        if node.get_type_name() == "Convolution":
            found.add(key)
        else:
            stack.extend(step(node))
    return found


def quantize_nncf(ov_model, calibration: Sequence[np.ndarray], *, keep_image_convs: bool = True):
    """NNCF post-training int8 of ``ov_model`` calibrated on ``calibration`` (input arrays, one batch
    each); the image-facing convs stay in float when ``keep_image_convs``."""
    try:
        import nncf
    except ImportError:
        raise ValueError("openvino:precision=int8 needs the nncf package: pip install nncf") from None
    if not len(calibration):
        raise ValueError("int8 quantization needs at least one calibration input")
    ignored = image_facing_convs(ov_model) if keep_image_convs else []
    scope = nncf.IgnoredScope(names=ignored, validate=False) if ignored else None
    kwargs = {"ignored_scope": scope} if scope is not None else {}
    nncf.set_log_level(logging.ERROR)                   # its per-op INFO lines and progress bars
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(ov_model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                             preset=nncf.QuantizationPreset.MIXED, **kwargs)


def export_ir(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, overwrite: bool = False,
              dynamic_spatial: bool = True) -> Path:
    """Write ``model`` as OpenVINO IR: ``path`` (``.xml``, the graph) and its ``.bin`` (the weights),
    converted from the ONNX export.  Both files appear together (built in a temporary sibling folder,
    then moved, the ``.bin`` first); existing ones are replaced only with ``overwrite``."""
    from .export import export_model
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR file name ends in .xml (got {path.name})")
    bin_path = path.with_suffix(".bin")
    check_output(path, overwrite=overwrite)
    check_output(bin_path, overwrite=overwrite)
    ov = openvino()
    tmp = temporary_sibling_dir(path)
    try:
        onnx_file = export_model(model, example, tmp / "model.onnx", dynamic_spatial=dynamic_spatial,
                                 log=lambda _: None)
        ov.save_model(read_onnx(onnx_file), str(tmp / "model.xml"), compress_to_fp16=False)
        os.replace(tmp / "model.bin", bin_path)
        os.replace(tmp / "model.xml", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class OpenVinoModule(nn.Module):
    """A model compiled by OpenVINO behind an ``nn.Module`` face (one tensor in, the first output out,
    float32), so the quality metrics score what the runtime serves (bf16 and int8 included)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, *, threads: int | None = None,
                 precision: str = "fp32", calibration: Sequence[np.ndarray] | None = None):
        super().__init__()
        self.precision = precision
        self.compiled = compile_ov(model, example, threads=threads, precision=precision, calibration=calibration,
                                   dynamic_spatial=True)
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.detach().float().cpu().numpy()})
        return torch.from_numpy(np.array(out[self.compiled.output(0)]))


def compile_ov(model: nn.Module, example: torch.Tensor, *, threads: int | None = None, precision: str = "fp32",
               calibration: Sequence[np.ndarray] | None = None, dynamic_spatial: bool = False):
    """``model`` exported to ONNX, read by OpenVINO, int8-quantized by NNCF when ``precision='int8'``
    (calibrated on ``calibration``, default: ``example`` alone), and compiled for the CPU."""
    from .export import export_model
    problem = precision_problem(precision)
    if problem:
        raise ValueError(problem)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model.eval(), example, os.path.join(tmp, "model.onnx"), log=lambda _: None,
                            dynamic_spatial=dynamic_spatial)
        ov_model = read_onnx(path)
        if precision == "int8":
            data = list(calibration) if calibration is not None else [example.detach().cpu().numpy()]
            ov_model = quantize_nncf(ov_model, data)
        return compile_model(ov_model, threads=threads, precision=precision)
