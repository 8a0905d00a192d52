"""convfactor export MODEL_DIR --format onnx|torchscript -o FILE.

The library calls behind it are :func:`convfactor.export.export_model` and
:func:`convfactor.export.check_onnx` (the file is checked in onnxruntime against PyTorch's output).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..export import check_onnx, export_model
from ..io import check_writable
from ..measure.count import count_params
from .common import load_model

HELP = "export a (compressed) model to ONNX or TorchScript, checking the ONNX file in onnxruntime"


def add_arguments(p) -> None:
    p.add_argument("model", help="a directory written by 'convfactor compress' (or a built-in model name)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the recorded one)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def run(args) -> int:
    check_writable(args.output)
    ns = type("A", (), {"model": args.model, "weights": None, "pretrained": False, "trust_pickle": False,
                        "input_size": args.input_size})()
    model, example = load_model(ns)
    source = Path(args.model)
    if args.input_size is None and (source / "recipe.json").is_file():
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
