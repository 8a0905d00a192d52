"""Export a (compressed) model to ONNX or TorchScript, and check an ONNX file in onnxruntime.

The exported graph is the factorized one (a chain of small convs), so the file shrinks with the
parameter count. ``convfactor export`` and the onnxruntime timing back-end both use these calls.

Two ONNX exporters are tried in turn: the ``torch.export``-based one (``dynamo=True``, which needs
the ``onnxscript`` package and writes opset 18 or newer) and the TorchScript one (``dynamo=False``).
``torch.export`` cannot trace every model a user brings (ConvNeXt, SwinIR, ... fail on a batch
guard, ``Invalid ranges [2:1]``), and it silently keeps opset 18 when asked for 17, so an exporter
counts as successful only when it wrote a file at the requested opset; otherwise the next one is
tried, and one line says which exporter wrote the file and why the first did not.  When neither
can, the export is one ``ValueError`` line and nothing is written.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .files import check_output

__all__ = ["export_model", "check_onnx", "output_leaves", "onnx_opset", "DEFAULT_OPSET", "OnnxModule", "ort_session"]

#: the opset written when none is asked for (the oldest the dynamo exporter writes natively)
DEFAULT_OPSET = 18
#: the dynamo exporter implements no older opset (it would convert, or silently keep 18)
DYNAMO_MIN_OPSET = 18
EXPORTER_NAMES = {"dynamo": "the dynamo exporter (torch.export)", "torchscript": "the TorchScript exporter"}


def output_leaves(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output, in order: a tensor, or tuples / lists / dicts of them
    (a dict in its insertion order, as torchvision's segmentation models return ``{'out', 'aux'}``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in output_leaves(item)]
    return []


def onnx_opset(path) -> int | None:
    """The default-domain opset an ONNX file imports (None if it imports none)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' prints, warnings and log records (tracebacks of failed attempts)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), None)   # torch.onnx's summary line
    if summary is not None:
        summary = summary.partition(">: ")[2] or summary
    return (summary or (lines[0] if lines else type(exc).__name__))[:200]


def _unavailable(exporter: str, opset: int) -> str | None:
    """Why ``exporter`` cannot write ``opset`` here, or None."""
    if exporter != "dynamo":
        return None
    if opset < DYNAMO_MIN_OPSET:
        return f"it writes opset {DYNAMO_MIN_OPSET} or newer"
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "the onnxscript package is not installed"
    return None


def _run_exporter(exporter: str, model: nn.Module, example: torch.Tensor, file: str, opset: int,
                  names: list[str], spatial: bool = False) -> None:
    """One ``torch.onnx.export`` call with the batch axis (axis 0) of the input and outputs dynamic, and
    with ``spatial`` the input's and outputs' spatial axes too."""
    common = dict(input_names=["input"], output_names=names, opset_version=opset)
    rest = range(2, example.dim()) if spatial else ()
    if exporter == "dynamo":
        shape = {0: torch.export.Dim("batch"), **{a: torch.export.Dim(f"size{a}") for a in rest}}
        torch.onnx.export(model, (example,), file, dynamo=True, external_data=False, dynamic_shapes=(shape,),
                          **common)
    else:
        axes = {name: {0: "batch", **{a: f"{name}_size{a}" for a in rest}} for name in ["input", *names]}
        torch.onnx.export(model, (example,), file, dynamo=False, do_constant_folding=True, dynamic_axes=axes,
                          **common)


def _export_onnx(model: nn.Module, example: torch.Tensor, file: str, opset: int,
                 spatial: bool = False) -> tuple[str, list[str]]:
    """Write ``file`` with the first exporter that succeeds at ``opset``; returns (exporter, the other
    attempts' reasons).  Raises a one-line ValueError when none does."""
    with torch.no_grad():
        n_out = len(output_leaves(model(example)))
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    attempts: list[str] = []
    for exporter in EXPORTER_NAMES:
        reason = _unavailable(exporter, opset)
        if reason is None:
            try:
                with _quiet():
                    _run_exporter(exporter, model, example, file, opset, names, spatial)
                written = onnx_opset(file)
                if written == opset:
                    return exporter, attempts
                reason = f"it wrote opset {written} instead of {opset}"
            except Exception as exc:  # noqa: BLE001 - any failure of one exporter means: try the next
                reason = f"failed: {_first_line(exc)}"
        attempts.append(f"{exporter}: {reason}")
    raise ValueError(f"ONNX export at opset {opset} failed ({'; '.join(attempts)})")


def export_model(model: nn.Module, example: torch.Tensor, path, fmt: str = "onnx", *, opset: int = DEFAULT_OPSET,
                 overwrite: bool = True, log: Callable[[str], None] | None = None,
                 dynamic_spatial: bool = False) -> Path:
    """Write ``model`` (traced at ``example``; batch axis dynamic for ONNX, and with ``dynamic_spatial``
    the image size too) to ``path`` atomically.

    ONNX: written by the first exporter that succeeds at ``opset`` (see the module docstring); the
    file's ``opset_import`` is the one requested.  ``log`` receives one line naming the exporter
    used (without ``log``, a fallback after a failed ``torch.export`` is a warning).  An existing
    ``path`` is replaced only with ``overwrite``.  On any failure nothing is left at ``path``.
    """
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown format {fmt!r} (onnx or torchscript)")
    path = check_output(path, overwrite=overwrite)
    model = model.eval()
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if fmt == "onnx":
            exporter, attempts = _export_onnx(model, example, tmp, opset, dynamic_spatial)
            message = f"ONNX opset {opset} written by {EXPORTER_NAMES[exporter]}" + (
                f" ({'; '.join(attempts)})" if attempts else "")
        else:
            with torch.no_grad(), _quiet():
                torch.jit.trace(model, example, strict=False).save(tmp)
            exporter, attempts, message = "trace", [], "TorchScript written by torch.jit.trace"
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if log is not None:
        log(message)
    elif any("failed" in a for a in attempts):
        warnings.warn(message, stacklevel=2)
    return path


def check_onnx(path, model: nn.Module, example: torch.Tensor) -> dict:
    """Run the ONNX file in onnxruntime against PyTorch, comparing every tensor of the output.

    Returns ``rel_error`` / ``max_abs_error`` (the worst over the output's tensors), ``rel_errors``
    (one per tensor), ``outputs`` (their count), ``output_shape`` (the first one's) and
    ``params_in_file``: the initializer elements stored in the file, i.e. the weights it really
    carries (factorized ones for a compressed model).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.detach().cpu().numpy()})
    with torch.no_grad():
        ref = [t.detach().cpu().numpy() for t in output_leaves(model.eval()(example))]
    if len(got) != len(ref):
        raise ValueError(f"{path} has {len(got)} outputs, the model {len(ref)}")
    rel = [float(np.linalg.norm(g - r)) / (float(np.linalg.norm(r)) or 1.0) for g, r in zip(got, ref)]
    max_abs = max((float(np.abs(g - r).max()) if g.size else 0.0) for g, r in zip(got, ref))
    graph = onnx.load(str(path), load_external_data=False).graph
    params = int(sum(int(np.prod(t.dims)) for t in graph.initializer))
    return {"rel_error": max(rel), "max_abs_error": max_abs, "rel_errors": rel, "outputs": len(got),
            "params_in_file": params, "output_shape": list(got[0].shape)}


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime session of ``path`` as convfactor times and serves it: CPU execution provider, all
    graph optimizations, ``threads`` intra-op threads (default: torch's), one inter-op thread."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime's CPU provider behind an ``nn.Module`` face (one tensor in, the
    first output out, float32), so the quality metrics that take a model (``evaluate_sr``, ...) score
    an exported or int8 file exactly as it will be served.  Not trainable."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)
