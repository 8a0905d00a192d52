"""convfactor export MODEL_DIR --format onnx|torchscript -o FILE.

The exported graph is the factorized one (a chain of small convs), so the file shrinks with the
parameter count; for ONNX the file is checked in onnxruntime against PyTorch's output.
:func:`export_model` and :func:`check_onnx` are the library calls behind the command.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

HELP = "export a (compressed) model to ONNX or TorchScript, checking the ONNX file in onnxruntime"

__all__ = ["export_model", "check_onnx"]


def add_arguments(p) -> None:
    p.add_argument("model", help="a directory written by 'convfactor compress' (or a built-in model name)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the recorded one)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def export_model(model: nn.Module, example: torch.Tensor, path, fmt: str = "onnx", *, opset: int = 17) -> Path:
    """Write ``model`` (traced at ``example``; batch axis dynamic for ONNX) to ``path`` atomically."""
    from ..io import check_writable
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


def run(args) -> int:
    from ..io import check_writable
    from ..measure.count import count_params
    from .common import load_model
    check_writable(args.output)
    ns = type("A", (), {"model": args.model, "weights": None, "pretrained": False, "trust_pickle": False,
                        "input_size": args.input_size})()
    model, example = load_model(ns)
    source = Path(args.model)
    if args.input_size is None and (source / "recipe.json").is_file():
        import json
        shape = json.loads((source / "recipe.json").read_text()).get("metadata", {}).get("input_shape")
        if shape:
            example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    path = export_model(model, example, args.output, args.format, opset=args.opset)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.2f} MiB; model has {count_params(model)} parameters)")
    if args.format == "onnx" and not args.no_check:
        res = check_onnx(path, model, example)
        print(f"onnxruntime output vs PyTorch: relative error {res['rel_error']:.2e}, "
              f"{res['params_in_file']} weights stored in the file")
        if res["rel_error"] > 1e-4:
            print("convfactor export: error: the ONNX output does not match PyTorch's", flush=True)
            return 1
    return 0
