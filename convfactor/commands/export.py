"""convfactor export MODEL_DIR --format onnx|torchscript|openvino -o FILE [--opset N] [--static-shape] [--overwrite].

An ONNX file takes any batch size and, unless ``--static-shape``, any height and width (checked in
onnxruntime at the example's size and 8 pixels larger).

The library calls behind it are :func:`convfactor.export.export_model` and
:func:`convfactor.export.check_onnx` (the file is checked in onnxruntime against PyTorch's output,
every tensor of it).  ``--format openvino`` writes OpenVINO IR (``FILE.xml`` + ``FILE.bin``, height and
width dynamic; :func:`convfactor.openvino_runtime.export_ir`), checked in OpenVINO against PyTorch at
the example's size and at another one.  The example input is the one recorded by ``convfactor compress`` unless
``--input-size`` is given.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..export import DEFAULT_OPSET, check_onnx, export_model
from ..files import check_output
from ..measure.count import count_params
from .common import load_model

HELP = "export a (compressed) model to ONNX, TorchScript or OpenVINO IR, checking the file in its runtime"


def add_arguments(p) -> None:
    p.add_argument("model", help="a directory written by 'convfactor compress' (or a built-in model name)")
    p.add_argument("--format", choices=["onnx", "torchscript", "openvino"], default="onnx",
                   help="onnx (default), torchscript, or openvino (IR: FILE.xml and FILE.bin)")
    p.add_argument("-o", "--output", required=True, help="file to write (for openvino: the .xml)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--input-size", help="example input shape, e.g. 1x3x256x256 (default: the recorded one)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset written (default: {DEFAULT_OPSET}); the dynamo exporter writes 18 and newer, "
                        f"the TorchScript exporter older ones too")
    p.add_argument("--static-shape", action="store_true",
                   help="ONNX: fix the height and width at the example's (by default they are dynamic, as the "
                        "batch axis is, so the file takes any image size)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def _check(path, model, example, dynamic_spatial: bool = False) -> int:
    """Compare the ONNX file with PyTorch in onnxruntime; 0 when they agree (and, with ``dynamic_spatial``,
    warn when it does not at another image size)."""
    try:
        res = check_onnx(path, model, example)
    except ImportError:
        print("convfactor export: error: onnxruntime is not installed, so the file was not checked "
              "(pip install onnxruntime, or pass --no-check)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (e.g. no float64 kernel for an op)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(f"convfactor export: error: onnxruntime could not run {path}, so it was not checked: {reason}",
              file=sys.stderr)
        return 1
    outputs = f" (worst of {res['outputs']} outputs)" if res["outputs"] > 1 else ""
    print(f"onnxruntime output vs PyTorch: relative error {res['rel_error']:.2e}{outputs}, "
          f"{res['params_in_file']} weights stored in the file")
    if res["rel_error"] > 1e-4:
        print("convfactor export: error: the ONNX output does not match PyTorch's", file=sys.stderr)
        return 1
    _check_other_batch(path, model, example)
    if dynamic_spatial:
        _check_other_size(path, model, example)
    return 0


def _check_other_batch(path, model, example) -> None:
    """Warn when the file is wrong or refused at another batch size: an exporter may trace the batch
    axis as a constant (seen with ConvNeXt-style reshapes and window attention)."""
    other = torch.cat([example] * (2 if example.shape[0] == 1 else 1) + [example[:1]])
    try:
        err = check_onnx(path, model, other)["rel_error"]
        problem = None if err <= 1e-4 else f"its output differs from PyTorch's by {err:.2e}"
    except Exception:  # noqa: BLE001 - onnxruntime refuses a static batch axis
        problem = "onnxruntime refuses it"
    if problem:
        print(f"WARNING: the file is correct at batch {example.shape[0]} only: at batch {other.shape[0]} {problem} "
              f"(the exporter fixed the batch axis); run it at batch {example.shape[0]}", file=sys.stderr)


def _larger(example: torch.Tensor) -> torch.Tensor:
    """``example`` 8 pixels larger along each spatial axis (edge pixels repeated)."""
    return torch.nn.functional.pad(example, (0, 8) * (example.dim() - 2), mode="replicate")


def _check_other_size(path, model, example) -> None:
    """Warn when the file (height and width exported dynamic) is wrong or refused 8 pixels larger each way,
    where the PyTorch model itself runs: a reshape to a fixed size can make the exporter fix it."""
    other = _larger(example)
    try:
        with torch.no_grad():
            model(other)
    except Exception:  # noqa: BLE001 - the model itself takes only some sizes: nothing to hold the file to
        return
    try:
        err = check_onnx(path, model, other)["rel_error"]
        problem = None if err <= 1e-4 else f"its output differs from PyTorch's by {err:.2e}"
    except Exception:  # noqa: BLE001 - onnxruntime refuses a fixed size
        problem = "onnxruntime refuses it"
    size, bigger = "x".join(map(str, example.shape[2:])), "x".join(map(str, other.shape[2:]))
    if problem:
        print(f"WARNING: the file is correct at {size} only: at {bigger} {problem} (the exporter fixed the image "
              f"size); run it at {size}, or export with --static-shape to say so in the file", file=sys.stderr)
    else:
        print(f"onnxruntime output vs PyTorch at {bigger} too (height and width are dynamic): relative error {err:.2e}")


def _note(line: str) -> None:
    print(f"note: {line}")


def _export_onnx(args, model, example):
    """The ONNX file, height and width dynamic unless ``--static-shape`` (or unless no exporter can make them
    so: then fixed, with a note saying why)."""
    spatial = example.dim() > 2 and not args.static_shape
    try:
        path = export_model(model, example, args.output, "onnx", opset=args.opset, overwrite=args.overwrite,
                            log=_note, dynamic_spatial=spatial)
    except ValueError as exc:
        if not spatial:
            raise
        _note(f"height and width could not be exported dynamic ({exc}); fixed at the example's instead")
        spatial = False
        path = export_model(model, example, args.output, "onnx", opset=args.opset, overwrite=args.overwrite,
                            log=_note, dynamic_spatial=False)
    return path, spatial


def _check_openvino(path, model, example) -> int:
    """Run the IR in OpenVINO against PyTorch at the example's size and at one 8 pixels larger each way
    (the IR's height and width are dynamic); 0 when both agree."""
    from ..openvino_runtime import compile_model
    compiled = compile_model(path)
    worst = 0.0
    for x in (example, _larger(example)):
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(compiled({0: x.numpy()})[compiled.output(0)].copy())
        worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    print(f"OpenVINO output vs PyTorch: relative error {worst:.2e} (at {tuple(example.shape[2:])} and 8 px larger)")
    if worst > 1e-4:
        print("convfactor export: error: the OpenVINO output does not match PyTorch's", file=sys.stderr)
        return 1
    return 0


def _export_openvino(args, model, example) -> int:
    from ..openvino_runtime import export_ir
    path = export_ir(model, example, args.output, overwrite=args.overwrite)
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    print(f"wrote {path} and {path.with_suffix('.bin').name} ({size / 2**20:.2f} MiB; model has "
          f"{count_params(model)} parameters)")
    return 0 if args.no_check else _check_openvino(path, model.eval(), example)


def run(args) -> int:
    check_output(args.output, overwrite=args.overwrite)             # before any work
    if args.format == "openvino":
        from ..openvino_runtime import openvino
        if not str(args.output).endswith(".xml"):
            raise ValueError(f"an OpenVINO IR file name ends in .xml (got {args.output})")
        check_output(str(args.output)[:-4] + ".bin", overwrite=args.overwrite)
        openvino()                                                  # installed? (one line if not)
    source = argparse.Namespace(model=args.model, weights=None, pretrained=False, trust_pickle=False,
                                input_size=args.input_size)
    model, example = load_model(source)
    if args.format == "openvino":
        return _export_openvino(args, model, example)
    if args.format == "onnx":
        path, spatial = _export_onnx(args, model, example)
    else:
        path, spatial = export_model(model, example, args.output, args.format, overwrite=args.overwrite,
                                     log=_note), False
    size = path.stat().st_size
    shape = (", height and width dynamic" if spatial else
             f", height and width fixed at {'x'.join(map(str, example.shape[2:]))}") \
        if args.format == "onnx" and example.dim() > 2 else ""
    print(f"wrote {path} ({size / 2**20:.2f} MiB; model has {count_params(model)} parameters{shape})")
    if args.format == "onnx" and not args.no_check:
        return _check(path, model, example, spatial)
    return 0
