"""Read Tencent ncnn models (a ``.param`` text graph plus a ``.bin`` of weights) into PyTorch.

Hand-written because nothing maintained does it: the ncnn tool chain (pnnx, onnx2ncnn) converts
*to* ncnn, and PyPI has no ncnn -> PyTorch converter.  Only what the published SR models in
:mod:`convfactor.models.published` need is read; anything else is refused with a one-line
ValueError naming the layer.

* :func:`parse_param` / :func:`read_param`: the text graph -> a list of :class:`NcnnLayer`.
* :func:`read_weights`: the ``.bin`` -> ``{layer name: {"weight"|"bias"|"slope": float32 array}}``.
  A weight blob starts with a 4-byte storage tag: ``0x01306B47`` fp16, ``0`` fp32 (also
  ``0x0002C056``, fp32); int8 (``0x000D4B38``) and table-quantized blobs are refused.  Biases
  and PReLU slopes are plain fp32 with no tag.
* :class:`NcnnNet`: the graph run by PyTorch modules (convs are named ``nn.Conv2d``), blob by blob.
* :func:`copy_weights`: a file's convs and PReLUs into a PyTorch model's, in graph order, with shape checks.

Blobs are ncnn's (C, H, W) mats; here they carry a batch axis, (B, C, H, W).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["NcnnLayer", "NcnnNet", "parse_param", "read_param", "read_weights", "load", "copy_weights",
           "MAGIC", "FP16_TAG", "INT8_TAG", "SUPPORTED"]

MAGIC = 7767517
FP16_TAG = 0x01306B47
INT8_TAG = 0x000D4B38
FP32_TAGS = (0, 0x0002C056)
#: layer types this reader maps onto PyTorch
SUPPORTED = ("Input", "Convolution", "ConvolutionDepthWise", "ReLU", "PReLU", "PixelShuffle", "Interp",
             "BinaryOp", "Split", "Concat", "Eltwise")
_FLOAT = re.compile(r"[.eE]|inf|nan", re.IGNORECASE)


@dataclass(frozen=True)
class NcnnLayer:
    """One line of a ``.param``: ``type name n_bottom n_top bottoms... tops... k=v...``."""
    type: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)

    def refuse(self, why: str) -> ValueError:
        return ValueError(f"ncnn layer {self.name!r} ({self.type}): {why}")


def _number(text: str):
    return float(text) if _FLOAT.search(text) else int(text)


def _params(tokens: list[str]) -> dict:
    """``["0=64", "-23310=1,2.0e-01"]`` -> ``{0: 64, 10: (0.2,)}`` (array keys -233xx -> xx)."""
    out = {}
    for token in tokens:
        key, _, value = token.partition("=")
        k = int(key)
        if k <= -23300:
            items = value.split(",")
            out[-k - 23300] = tuple(_number(v) for v in items[1:1 + int(items[0])])
        else:
            out[k] = _number(value)
    return out


def parse_param(text: str) -> list[NcnnLayer]:
    """The text of an ncnn ``.param`` file -> its layers, in file (= execution) order."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        first = " ".join(lines[0]) if lines else "nothing"
        raise ValueError(f"not an ncnn .param text file: first line {first!r}, expected {MAGIC}")
    n_layers = int(lines[1][0])
    layers = []
    for tokens in lines[2:]:
        try:
            kind, name, nb, nt = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
            blobs = tokens[4:4 + nb + nt]
            params = _params(tokens[4 + nb + nt:])
        except (ValueError, IndexError) as exc:
            raise ValueError(f"cannot read the .param line {' '.join(tokens)!r} ({exc})") from None
        layers.append(NcnnLayer(kind, name, tuple(blobs[:nb]), tuple(blobs[nb:]), params))
    if len(layers) != n_layers:
        raise ValueError(f"the .param header promises {n_layers} layers but lists {len(layers)}")
    return layers


def read_param(path) -> list[NcnnLayer]:
    return parse_param(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- .bin
def _need(buf: memoryview, end: int, layer: NcnnLayer) -> None:
    if end > len(buf):
        raise layer.refuse(f"the .bin ends ({len(buf)} bytes) before this layer's weights do ({end} bytes)")


def _tagged(buf: memoryview, pos: int, count: int, layer: NcnnLayer) -> tuple[np.ndarray, int]:
    """A weight blob of ``count`` values with its 4-byte storage tag at ``pos`` -> (float32 values, next pos)."""
    _need(buf, pos + 4, layer)
    tag = int.from_bytes(buf[pos:pos + 4], "little")
    pos += 4
    if tag == FP16_TAG:
        _need(buf, pos + 2 * count, layer)
        data = np.frombuffer(buf, np.float16, count, pos).astype(np.float32)
        return data, pos + (2 * count + 3) // 4 * 4
    if tag in FP32_TAGS:
        return _raw(buf, pos, count, layer)
    if tag == INT8_TAG:
        raise layer.refuse("int8-quantized weights (storage tag 0x000D4B38) are not supported; use an fp16/fp32 model")
    raise layer.refuse(f"unknown weight storage tag 0x{tag:08X} (table-quantized weights are not supported)")


def _raw(buf: memoryview, pos: int, count: int, layer: NcnnLayer) -> tuple[np.ndarray, int]:
    _need(buf, pos + 4 * count, layer)
    return np.frombuffer(buf, np.float32, count, pos).copy(), pos + 4 * count


def _conv_blobs(buf: memoryview, pos: int, layer: NcnnLayer) -> tuple[dict, int]:
    if layer.get(8, 0):
        raise layer.refuse("int8 convolutions (int8_scale_term) are not supported")
    if layer.get(19, 0):
        raise layer.refuse("dynamic weights (weights from a blob) are not supported")
    out = {}
    out["weight"], pos = _tagged(buf, pos, int(layer.get(6, 0)), layer)
    if layer.get(5, 0):
        out["bias"], pos = _raw(buf, pos, int(layer.get(0, 0)), layer)
    return out, pos


def read_weights(path, layers: list[NcnnLayer]) -> dict[str, dict[str, np.ndarray]]:
    """Read the ``.bin`` of ``layers``: ``{layer name: {"weight", "bias" (if any) | "slope"}}``, float32, flat."""
    buf = memoryview(Path(path).read_bytes())
    pos, out = 0, {}
    for layer in layers:
        if layer.type not in SUPPORTED:
            raise layer.refuse(f"layer type not supported (supported: {', '.join(SUPPORTED)})")
        if layer.type.startswith("Convolution"):
            out[layer.name], pos = _conv_blobs(buf, pos, layer)
        elif layer.type == "PReLU":
            slope, pos = _raw(buf, pos, int(layer.get(0, 1)), layer)
            out[layer.name] = {"slope": slope}
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} bytes left after the last layer's weights; "
                         "the .bin does not belong to this .param")
    return out


# ---------------------------------------------------------------------------------------------- modules
class Eltwise(nn.Module):
    """ncnn Eltwise on (B, C, H, W) blobs: 0 product, 1 sum (each input times its coefficient), 2 max."""

    def __init__(self, op: int, coeffs=()):
        super().__init__()
        self.op, self.coeffs = int(op), tuple(float(c) for c in coeffs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0] * self.coeffs[0] if self.op == 1 and self.coeffs else xs[0]
        for i, x in enumerate(xs[1:], 1):
            if self.op == 0:
                out = out * x
            elif self.op == 2:
                out = torch.maximum(out, x)
            else:
                out = out + (x * self.coeffs[i] if self.coeffs else x)
        return out


#: ncnn BinaryOp op_type -> f(a, b); 7 and 8 are reversed subtraction and division
BINARY_OPS = {0: torch.add, 1: torch.sub, 2: torch.mul, 3: torch.div, 4: torch.maximum, 5: torch.minimum,
              7: lambda a, b: b - a, 8: lambda a, b: b / a}


class BinaryOp(nn.Module):
    """ncnn BinaryOp: ``a op b`` of two broadcastable blobs, or ``a op scalar`` (``with_scalar=1``)."""

    def __init__(self, op: int, scalar: float | None = None):
        super().__init__()
        self.op, self.scalar = int(op), scalar

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.scalar is not None:
            b = torch.full((), self.scalar, dtype=a.dtype, device=a.device)
        return BINARY_OPS[self.op](a, b)


class Concat(nn.Module):
    """ncnn Concat along ``axis`` of the (C, H, W) blob: dim ``axis + 1`` of (B, C, H, W)."""

    def __init__(self, axis: int):
        super().__init__()
        self.dim = axis + 1 if axis >= 0 else axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)


def _activation(layer: NcnnLayer, kind: int, args) -> nn.Module | None:
    """A Convolution's fused activation (param 9, its arguments in array param 10)."""
    if kind == 0:
        return None
    acts = {1: lambda: nn.ReLU(), 2: lambda: nn.LeakyReLU(float(args[0])),
            3: lambda: nn.Hardtanh(float(args[0]), float(args[1])), 4: lambda: nn.Sigmoid(), 5: lambda: nn.Mish()}
    if kind not in acts:
        raise layer.refuse(f"fused activation_type {kind} is not supported")
    return acts[kind]()


def _conv(layer: NcnnLayer, blobs: dict | None) -> nn.Module:
    """Convolution / ConvolutionDepthWise -> nn.Conv2d, after a ZeroPad2d if the padding is uneven and
    before its fused activation (an nn.Sequential when there is either)."""
    out_ch, kw = int(layer.get(0)), int(layer.get(1, 0))
    kh, dw, sw, pl = int(layer.get(11, kw)), int(layer.get(2, 1)), int(layer.get(3, 1)), int(layer.get(4, 0))
    dh, sh, pt = int(layer.get(12, dw)), int(layer.get(13, sw)), int(layer.get(14, pl))
    pr, pb = int(layer.get(15, pl)), int(layer.get(16, pt))
    groups = int(layer.get(7, 1)) if layer.type == "ConvolutionDepthWise" else 1
    if min(pl, pt, pr, pb) < 0:
        raise layer.refuse("'same' padding (pad -233/-234) is not supported")
    if layer.get(18, 0.0):
        raise layer.refuse("a non-zero pad_value is not supported")
    size = int(layer.get(6, 0))
    in_ch = size * groups // max(out_ch * kh * kw, 1)
    if in_ch * out_ch * kh * kw != size * groups or in_ch == 0:
        raise layer.refuse(f"weight_data_size {size} does not fit {out_ch} outputs of {kh}x{kw} (groups {groups})")
    even = pl == pr and pt == pb
    make = nn.Conv2d if blobs is None else partial(nn.utils.skip_init, nn.Conv2d)    # no random init to overwrite
    conv = make(in_ch, out_ch, (kh, kw), (sh, sw), (pt, pl) if even else 0, (dh, dw), groups,
                bias=bool(layer.get(5, 0)))
    if blobs is not None:
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(blobs["weight"]).view_as(conv.weight))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(blobs["bias"]))
    parts = ([] if even else [nn.ZeroPad2d((pl, pr, pt, pb))]) + [conv]
    act = _activation(layer, int(layer.get(9, 0)), layer.get(10, ()))
    parts += [act] if act is not None else []
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _interp(layer: NcnnLayer) -> nn.Module:
    if int(layer.get(0, 0)) != 1:
        raise layer.refuse(f"resize_type {layer.get(0, 0)} is not supported (only 1, nearest)")
    if layer.get(5, 0):
        raise layer.refuse("dynamic_target_size is not supported")
    if layer.get(3, 0) and layer.get(4, 0):
        return nn.Upsample(size=(int(layer.get(3)), int(layer.get(4))), mode="nearest")
    return nn.Upsample(scale_factor=(float(layer.get(1, 1.0)), float(layer.get(2, 1.0))), mode="nearest")


def _prelu(layer: NcnnLayer, blobs: dict | None) -> nn.Module:
    prelu = nn.PReLU(int(layer.get(0, 1)))
    if blobs is not None:
        with torch.no_grad():
            prelu.weight.copy_(torch.from_numpy(blobs["slope"]))
    return prelu


def _module(layer: NcnnLayer, blobs: dict | None) -> nn.Module | None:
    """The PyTorch module of one layer (None for Input and Split, which the net handles itself)."""
    kind = layer.type
    if kind not in SUPPORTED:
        raise layer.refuse(f"layer type not supported (supported: {', '.join(SUPPORTED)})")
    if kind in ("Input", "Split"):
        return None
    if kind.startswith("Convolution"):
        return _conv(layer, blobs)
    if kind == "PixelShuffle":
        if int(layer.get(1, 0)):
            raise layer.refuse("PixelShuffle mode 1 (DCR order) is not supported")
        return nn.PixelShuffle(int(layer.get(0, 1)))
    if kind == "BinaryOp":
        if int(layer.get(0, 0)) not in BINARY_OPS:
            raise layer.refuse(f"op_type {layer.get(0)} is not supported")
        return BinaryOp(int(layer.get(0, 0)), float(layer.get(2, 0.0)) if layer.get(1, 0) else None)
    if kind == "Eltwise":
        return Eltwise(int(layer.get(0, 0)), layer.get(1, ()))
    if kind == "ReLU":
        slope = float(layer.get(0, 0.0))
        return nn.LeakyReLU(slope) if slope else nn.ReLU()
    builders = {"PReLU": lambda: _prelu(layer, blobs), "Interp": lambda: _interp(layer),
                "Concat": lambda: Concat(int(layer.get(0, 0)))}
    return builders[kind]()


class NcnnNet(nn.Module):
    """An ncnn graph run by PyTorch modules, layer by layer in file order.

    ``forward(*inputs)``: one (B, C, H, W) tensor per Input layer -> the output blob (a tuple if
    several): by default every blob no layer reads.  ``layers`` holds one module per weighted or
    computing layer, keyed by its ncnn name (non-word characters -> ``_``).
    """

    def __init__(self, layers: list[NcnnLayer], weights: dict | None = None, outputs=None):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.inputs: list[str] = []
        self.steps: list[tuple[str | None, tuple[str, ...], tuple[str, ...]]] = []
        consumed, produced = set(), []
        for layer in layers:
            module = _module(layer, None if weights is None else weights.get(layer.name))
            if layer.type == "Input":
                self.inputs += layer.tops
                continue
            key = None
            if module is not None:
                key = re.sub(r"\W", "_", layer.name)
                while key in self.layers or hasattr(self.layers, key):     # unique, and not a method's name
                    key += "_"
                self.layers[key] = module
            self.steps.append((key, layer.bottoms, layer.tops))
            consumed.update(layer.bottoms)
            produced += layer.tops
        self.outputs = list(outputs) if outputs else [b for b in produced if b not in consumed]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.inputs):
            raise ValueError(f"this ncnn net takes {len(self.inputs)} input(s) ({', '.join(self.inputs)}), "
                             f"got {len(inputs)}")
        blobs = dict(zip(self.inputs, inputs))
        for key, bottoms, tops in self.steps:
            args = [blobs[b] for b in bottoms]
            if key is None:                         # Split: every top is the bottom
                blobs.update((t, args[0]) for t in tops)
            else:
                blobs[tops[0]] = self.layers[key](*args)
        outs = tuple(blobs[name] for name in self.outputs)
        return outs[0] if len(outs) == 1 else outs


def load(param_path, bin_path=None, outputs=None) -> NcnnNet:
    """``model.param`` (+ ``model.bin`` beside it unless given) -> an :class:`NcnnNet` in eval mode."""
    param_path = Path(param_path)
    layers = read_param(param_path)
    weights = read_weights(bin_path or param_path.with_suffix(".bin"), layers)
    return NcnnNet(layers, weights, outputs).eval()


def copy_weights(model: nn.Module, net: NcnnNet) -> None:
    """Copy ``net``'s convs and PReLUs into ``model``'s ``nn.Conv2d`` / ``nn.PReLU`` modules, pairing both
    in module order; a different count, shape, stride, padding, dilation, groups or bias is a ValueError."""
    for kind in (nn.Conv2d, nn.PReLU):
        src = [(n, m) for n, m in net.named_modules() if isinstance(m, kind)]
        dst = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
        if len(src) != len(dst):
            raise ValueError(f"the ncnn net has {len(src)} {kind.__name__} layers, the model {len(dst)}")
        for (sname, s), (dname, d) in zip(src, dst):
            facts = [(p.shape if p is not None else None) for p in (s.weight, getattr(s, "bias", None))]
            ours = [(p.shape if p is not None else None) for p in (d.weight, getattr(d, "bias", None))]
            if kind is nn.Conv2d:
                facts += [s.stride, s.padding, s.dilation, s.groups]
                ours += [d.stride, d.padding, d.dilation, d.groups]
            if facts != ours:
                raise ValueError(f"ncnn layer {sname} {facts} does not fit model layer {dname} {ours}")
            with torch.no_grad():
                for key, value in s.named_parameters():
                    d.get_parameter(key).copy_(value)
