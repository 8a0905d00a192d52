"""Static int8 quantization of an exported ONNX model with ONNX Runtime's own tools (low rank stacked
with int8, issue 15).

:func:`quantize_int8` is glue around ``onnxruntime.quantization.quantize_static``: the QDQ format
(QuantizeLinear/DequantizeLinear pairs that ORT's CPU execution provider fuses into integer
kernels), int8 weights per output channel, uint8 activations (x86's u8s8 kernels) whose ranges are
calibrated on the inputs given (min-max by default; ``percentile``/``entropy`` on request).
On x86 CPUs without VNNI the u8s8 kernels can saturate, so weights then use 7 bits
(``reduce_range``, as ORT's documentation advises); the report records which.

Kept in float32 by default: every conv that reads or writes the image itself: the convs the input
reaches, or that reach an output, through no other conv (a mean shift, PixelShuffle, residual add or a
merge's bias field between them changes nothing), and any with 4 channels or fewer on either side.  int8's 256 levels are the image's own resolution there, so rounding the first
layer's input and the last layer's output costs PSNR directly, and these layers hold a negligible
share of the MACs.  :func:`image_conv_nodes` finds them from the weight shapes in the graph, so it
works for either exporter's node names.

Nothing numerical is hand-written here: the quantizer, calibrators and kernels are ORT's.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import check_output
from .utils import cpu_has

__all__ = ["QuantConfig", "QuantReport", "quantize_int8", "image_conv_nodes", "CALIBRATIONS"]

CALIBRATIONS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.  ``keep_fp32``: ``"image"`` (the image-facing convs, see the module docstring),
    or node names, or ``()`` to quantize everything; ``reduce_range``: None picks it from the CPU."""

    calibration: str = "minmax"
    per_channel: bool = True
    keep_fp32: str | tuple[str, ...] = "image"
    reduce_range: bool | None = None

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if isinstance(self.keep_fp32, str) and self.keep_fp32 != "image":
            raise ValueError(f"keep_fp32 must be 'image' or a list of node names, got {self.keep_fp32!r}")


@dataclass
class QuantReport:
    """What :func:`quantize_int8` did."""

    path: str
    kept_fp32: list[str]
    quantized_convs: int
    calibration: str
    calibration_inputs: int
    reduce_range: bool
    bytes_before: int
    bytes_after: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


CONV_OPS = ("Conv", "ConvTranspose")


def image_conv_nodes(model, max_channels: int = 4) -> list[str]:
    """Names of the Conv nodes of an ONNX ``model`` that read or write the image: those the graph's inputs
    reach, or that reach its outputs, through no other Conv, and those whose weight has ``max_channels``
    or fewer output or input channels (``weight: (N, C/g, *k)`` read from the initializers)."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    found = _edge_convs(model.graph)
    for node in model.graph.node:
        if node.op_type in CONV_OPS and len(node.input) > 1 and node.input[1] in weights:
            shape = weights[node.input[1]]
            if min(shape[0], shape[1]) <= max_channels:
                found.add(node.name)
    return [n.name for n in model.graph.node if n.name in found]


def _edge_convs(graph) -> set[str]:
    """Conv nodes reached from the graph's inputs (forward) or its outputs (backward) through no other Conv."""
    producer = {t: n for n in graph.node for t in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    found, seen = set(), set()
    stack = [(n, "fwd") for i in graph.input for n in consumers.get(i.name, [])]
    stack += [(producer[o.name], "back") for o in graph.output if o.name in producer]
    while stack:
        node, way = stack.pop()
        if (node.name, way) in seen:
            continue
        seen.add((node.name, way))
        if node.op_type in CONV_OPS:
            found.add(node.name)
        elif way == "fwd":
            stack += [(c, way) for t in node.output for c in consumers.get(t, [])]
        else:
            stack += [(producer[t], way) for t in node.input if t in producer]
    return found


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of input arrays."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]):
        self.items = iter([{name: np.ascontiguousarray(x, dtype=np.float32)} for x in inputs])

    def get_next(self):
        return next(self.items, None)


def quantize_int8(src, dst, inputs: Sequence[np.ndarray], config: QuantConfig | None = None, *,
                  overwrite: bool = False) -> QuantReport:
    """Write a static-int8 copy of the ONNX file ``src`` to ``dst`` (atomically; ``src`` is never
    changed), calibrated on ``inputs`` (arrays shaped like the model's input).

    A bad config, a missing ``src``, no inputs or an existing ``dst`` without ``overwrite`` fail before
    anything is written."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    config = config or QuantConfig()
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX file at {src}")
    if not inputs:
        raise ValueError("int8 calibration needs at least one input")
    dst = check_output(dst, overwrite=overwrite)
    model = onnx.load(str(src))
    kept = image_conv_nodes(model) if config.keep_fp32 == "image" else list(config.keep_fp32)
    unknown = sorted(set(kept) - {n.name for n in model.graph.node})
    if unknown:
        raise ValueError(f"keep_fp32 names nodes the graph does not have: {', '.join(unknown[:5])}")
    reduce_range = (not cpu_has("avx512_vnni", "avx_vnni")) if config.reduce_range is None else bool(config.reduce_range)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.calibration]
    fd, tmp = tempfile.mkstemp(dir=dst.resolve().parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        quantize_static(str(src), tmp, _Reader(model.graph.input[0].name, inputs), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=config.per_channel, reduce_range=reduce_range, calibrate_method=method,
                        nodes_to_exclude=kept)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    quantized = onnx.load(str(dst))
    convs = {n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    deq_weights = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    quantized_convs = sum(1 for n in quantized.graph.node if n.name in convs and len(n.input) > 1
                          and n.input[1] in deq_weights)
    return QuantReport(str(dst), kept, quantized_convs, config.calibration, len(inputs), reduce_range,
                       src.stat().st_size, dst.stat().st_size)
