"""Export a (compressed) model to ONNX or TorchScript, and check an ONNX file in onnxruntime.

The exported graph is the factorized one (a chain of small convs), so the file shrinks with the
parameter count. ``convfactor export`` and the onnxruntime timing back-end both use these calls.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .io import check_writable

__all__ = ["export_model", "check_onnx"]


def export_model(model: nn.Module, example: torch.Tensor, path, fmt: str = "onnx", *, opset: int = 17) -> Path:
    """Write ``model`` (traced at ``example``; batch axis dynamic for ONNX) to ``path`` atomically."""
    path = check_writable(path)
    model = model.eval()
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                try:
                    import onnxscript  # noqa: F401  - the torch.export-based exporter needs it
                    dynamo = True
                except ImportError:
                    dynamo = False
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kwargs = dict(input_names=["input"], output_names=["output"], opset_version=opset)
                    if dynamo:
                        torch.onnx.export(model, (example,), tmp, dynamo=True, external_data=False,
                                          dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
                    else:
                        torch.onnx.export(model, (example,), tmp, dynamo=False, do_constant_folding=True,
                                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **kwargs)
            elif fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.jit.trace(model, example).save(tmp)
            else:
                raise ValueError(f"unknown format {fmt!r} (onnx or torchscript)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_onnx(path, model: nn.Module, example: torch.Tensor) -> dict:
    """Run the ONNX file in onnxruntime; ``{'rel_error', 'max_abs_error', 'params_in_file'}``.

    ``params_in_file`` counts the initializer elements stored in the file, i.e. the weights it
    really carries (factorized ones for a compressed model).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.detach().cpu().numpy()})[0]
    with torch.no_grad():
        ref = model.eval()(example).detach().cpu().numpy()
    graph = onnx.load(str(path), load_external_data=False).graph
    params = int(sum(int(np.prod(t.dims)) for t in graph.initializer))
    denom = float(np.linalg.norm(ref)) or 1.0
    return {"rel_error": float(np.linalg.norm(got - ref)) / denom, "max_abs_error": float(np.abs(got - ref).max()),
            "params_in_file": params, "output_shape": list(got.shape)}
