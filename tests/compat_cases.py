"""The compatibility matrix's cases and checks, shared by ``tests/test_matrix.py`` (CI) and
``scripts/compat_matrix.py`` (the Markdown table).

Each case is a third-party architecture (torchvision, timm, spandrel) with seeded random weights and
no constant tensor left (:func:`randomize_constants`), in float64, at a small input.  The layers are
every Conv/Linear found independently of the library (:func:`layers_of`) within a size budget
(:func:`budget`).  For each method the matrix checks issue 14's contract:

* **full rank**: every selected layer is factorized at its method's full rank with the model's output
  within ``EXACT`` relative error, or skipped with a stated reason; none is missing from the report;
* **macs_ratio=0.5**: one whole-model rule runs (layers that cannot reach it are skipped with a
  reason), and the output is finite;
* **save/load**: ``convfactor.save`` then ``convfactor.load`` onto a base model whose tensors are
  all NaN gives a bit-identical output;
* **ONNX** (cases with ``export=True``): ``export_model`` + ``check_onnx`` agree in float32.

A model's library is imported through ``tests/thirdparty.py`` (the torch.library shim for
torchvision's compiled ops on machines where they do not load; a plain import elsewhere).
"""
from __future__ import annotations

import copy
import glob
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import convfactor
from convfactor import models
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec

#: relative output error allowed at full rank, in float64
EXACT = 1e-6

METHODS = ("channel_svd", "sliced_svd", "spatial_svd", "tucker2", "cp", "depthwise", "basis", "linear_svd", "tt", "lowrank_sparse")


@dataclass(frozen=True)
class ModelCase:
    """One architecture: ``spec`` (as :func:`convfactor.models.get` takes it) built with ``kwargs``,
    run at ``input_shape``.  ``library`` is the package tests/thirdparty.py must import first.

    ``nothing_factorized`` names the methods that, by design, factorize none of the model's selected
    layers, each with the words its skip reasons hold (every reason holds one of them, and each occurs):
    any other cell that factorizes nothing fails, so a matrix of skips cannot pass as a matrix of successes."""

    key: str
    spec: str
    input_shape: tuple[int, ...]
    library: str
    kwargs: dict = field(default_factory=dict)
    export: bool = False
    note: str = ""
    nothing_factorized: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _small_vit() -> dict:
    return dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)


def _small_swinir() -> dict:
    return dict(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
                upscale=2, upsampler="pixelshuffledirect", drop_path_rate=0.0)


CASES: tuple[ModelCase, ...] = (
    ModelCase("resnet18", "torchvision:resnet18", (1, 3, 32, 32), "torchvision", export=True),
    ModelCase("mobilenet_v3_small", "torchvision:mobilenet_v3_small", (1, 3, 32, 32), "torchvision", export=True),
    ModelCase("efficientnet_b0", "torchvision:efficientnet_b0", (1, 3, 32, 32), "torchvision"),
    ModelCase("regnet_x_400mf", "torchvision:regnet_x_400mf", (1, 3, 32, 32), "torchvision"),
    ModelCase("densenet121", "torchvision:densenet121", (1, 3, 32, 32), "torchvision"),
    ModelCase("shufflenet_v2_x0_5", "torchvision:shufflenet_v2_x0_5", (1, 3, 32, 32), "torchvision"),
    ModelCase("squeezenet1_0", "torchvision:squeezenet1_0", (1, 3, 48, 48), "torchvision", export=True,
              note="48 px, so its last stage is 2x2, not 1x1"),
    ModelCase("convnext_tiny", "torchvision:convnext_tiny", (1, 3, 32, 32), "torchvision"),
    ModelCase("vit (small)", "torchvision.models.vision_transformer:VisionTransformer", (1, 3, 32, 32),
              "torchvision", kwargs=_small_vit(), note="torchvision's ViT class, 2 layers of width 32",
              nothing_factorized={"sliced_svd": ("sliced_svd: nn.Linear is not supported",     # MLPs, head
                                                 "2 slices do not divide the 3 input channels",  # the patch conv
                                                 "MultiheadAttention reads out_proj.weight")}),
    ModelCase("deeplabv3_mobilenet_v3_large", "torchvision:deeplabv3_mobilenet_v3_large", (1, 3, 32, 32),
              "torchvision", export=True),
    ModelCase("r3d_18", "torchvision:r3d_18", (1, 3, 4, 32, 32), "torchvision",
              note="video: 4 frames; 16 of its 20 convs are the Conv3d subclass Conv3DSimple",
              nothing_factorized={"spatial_svd": ("spatial_svd: Conv3d is not supported",
                                                  "spatial_svd: nn.Linear is not supported")}),
    ModelCase("timm resnetv2_50x1_bit", "timm:resnetv2_50x1_bit", (1, 3, 32, 32), "timm",
              note="StdConv2d (weight standardization)",   # every selected layer (the 1x1 head is over budget)
              nothing_factorized=dict.fromkeys(METHODS, ("StdConv2d overrides Conv2d.forward",))),
    ModelCase("timm tf_efficientnet_b0", "timm:tf_efficientnet_b0", (1, 3, 32, 32), "timm",
              note="Conv2dSame (TF 'SAME' padding)"),
    ModelCase("timm convnext_atto", "timm:convnext_atto", (1, 3, 32, 32), "timm", export=True),
    ModelCase("spandrel SPAN", "spandrel.architectures.SPAN:SPAN", (1, 3, 16, 16), "spandrel",
              kwargs=dict(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
              note="x2, 16 features; its blocks read their convs' weights in forward (re-parameterization)"),
    ModelCase("spandrel SwinIR (small)", "spandrel.architectures.SwinIR:SwinIR", (1, 3, 16, 16), "spandrel",
              kwargs=_small_swinir(), note="x2, one stage of 2 blocks, width 12, window 4"),
)


def case(key: str) -> ModelCase:
    return next(c for c in CASES if c.key == key)


def build(model_case: ModelCase) -> tuple[nn.Module, torch.Tensor]:
    """The case's model (seeded random init, float64, eval) and its example input (seeded)."""
    import thirdparty            # tests/ is on sys.path (conftest.py; the script adds it)
    thirdparty.load(model_case.library)
    model = models.get(model_case.spec, **model_case.kwargs).double().eval()
    randomize_constants(model)
    example = torch.randn(*model_case.input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, example


@torch.no_grad()
def randomize_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every branch of a randomly initialised model visible in its output, in place.

    Initialisations leave some tensors constant that training would change: zero-initialised
    heads (torchvision's ViT) and last convs or norms of residual blocks (timm's ``zero_init_last``),
    ConvNeXt's 1e-6 layer scale, BatchNorm's unit statistics.  A wrong factorization behind such a
    tensor would not show in the output, so each constant parameter is redrawn (a constant ``c != 0``
    as ``U(0.5, 1.5)``, zeros as ``N(0, 1/fan_in)`` for matrices or ``N(0, 0.1^2)`` for vectors) and
    BatchNorm's running mean / variance as ``N(0, 0.1^2)`` / ``U(0.5, 1.5)``: a seeded stand-in for
    trained weights.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "scale":
            return torch.rand(like.shape, generator=gen, dtype=like.dtype) + 0.5
        std = (1.0 / max(1, like[0].numel())) ** 0.5 if like.dim() >= 2 else 0.1
        return torch.randn(like.shape, generator=gen, dtype=like.dtype) * std

    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
            p.copy_(draw(p, "scale" if p.reshape(-1)[0] != 0 else "zero"))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(draw(m.running_mean, "zero"))
            m.running_var.copy_(draw(m.running_var, "scale"))
    return model


def flat_output(out: Any) -> torch.Tensor:
    """Every tensor of a model's output (a tensor, tuple/list or dict) as one flat vector."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    return torch.cat([flat_output(o) for o in out])


@torch.no_grad()
def relative_output_error(model: nn.Module, reference: nn.Module, example: torch.Tensor) -> float:
    want, got = flat_output(reference(example.clone())), flat_output(model(example.clone()))
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@dataclass(frozen=True)
class Budget:
    """Which layers a cell factorizes: those with at most ``max_weight`` kernel elements, and at most
    ``max_layers`` of them (spread evenly over the network's depth), to keep the matrix within CI time."""

    max_weight: int
    max_layers: int | None = None


#: SVD-type methods: every layer up to 300k weights (e.g. ResNet-18's first three stages)
CHEAP = Budget(max_weight=1_200_000)
#: the iterative fits (CP's ALS, low-rank + sparse's ADMM) on a few small layers of each model
EXPENSIVE = Budget(max_weight=100_000, max_layers=6)
EXPENSIVE_METHODS = ("cp", "lowrank_sparse")


def budget(method: str) -> Budget:
    return EXPENSIVE if method in EXPENSIVE_METHODS else CHEAP


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv (of any dimension, transposed or not, subclasses included) and Linear, by name: what a
    user selecting ``default`` means, found independently of the library's own candidate list, so that a
    layer the library leaves out silently shows up as missing from the report."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def selected_layers(model: nn.Module, method: str) -> list[str]:
    """Names of the layers a cell selects: :func:`layers_of` within :func:`budget` (the method must
    factorize each or skip it with a reason)."""
    limit = budget(method)
    names = [n for n, m in layers_of(model).items()
             if getattr(getattr(m, "weight", None), "numel", lambda: 0)() <= limit.max_weight]
    if limit.max_layers is not None and len(names) > limit.max_layers:
        step = (len(names) - 1) / (limit.max_layers - 1)
        names = [names[round(i * step)] for i in range(limit.max_layers)]
    return names


def full_rank_of(method: str, layer: nn.Module) -> int | list[int] | None:
    """The method's full rank for ``layer`` as a rule value, or None where the layer's spec cannot be
    read or the method cannot take it.  A zero rank (low-rank + sparse's sparse part, at full low rank)
    becomes 1: rules take positive ranks."""
    configured = registry.get(method)
    try:
        spec = ConvSpec.from_module(layer)
        configured.check(spec)
        rank = configured.full_rank(spec)
    except Exception:  # noqa: BLE001 - unsupported layers: compress gives the reason
        return None
    return [max(1, int(r)) for r in rank] if len(rank) != 1 else max(1, int(rank[0]))


def full_rank_rules(model: nn.Module, method: str) -> list[dict]:
    """A rule selecting every selected layer (rank 1: only layers the method cannot take keep it, and
    compress must skip those with a reason), then one rule per layer at the method's full rank."""
    names = selected_layers(model, method)
    rules = [{**whole_model_selector(model, names), "method": method, "rank": 1}] if names else []
    for name in names:
        rank = full_rank_of(method, model.get_submodule(name))
        if rank is not None:
            rules.append({"op_names": [glob.escape(name)], "method": method, "rank": rank})
    return rules


def whole_model_selector(model: nn.Module, names: list[str]) -> dict:
    """Rule keys selecting ``names`` the way a user asks for the whole model: ``op_types: [default]``
    with the other layers excluded, so ``macs_ratio`` is a whole-model target (a layer that cannot reach
    it is skipped with its reason) rather than an explicit per-layer request (which fails loudly)."""
    keep = set(names)
    others = [glob.escape(n) for n in layers_of(model) if n not in keep]
    return {"op_types": ["default"], **({"exclude_op_names": others} if others else {})}


@dataclass
class Outcome:
    """What one (model, method, check) cell found: layers factorized, skipped (with their reasons) and
    missing from the report (selected, yet neither factorized nor skipped), the relative output error
    against the original, and the wall time."""

    factorized: int = 0
    skipped: int = 0
    reasons: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    error: float | None = None
    seconds: float = 0.0


def _outcome(report, names: list[str], errors: tuple[nn.Module, nn.Module, torch.Tensor], start: float) -> Outcome:
    reported = {L.name for L in report.layers}
    return Outcome(len(report.compressed), len(report.skipped), {L.name: L.skipped for L in report.skipped},
                   [n for n in names if n not in reported], relative_output_error(*errors),
                   time.perf_counter() - start)


def run_full_rank(model: nn.Module, example: torch.Tensor, method: str):
    """Compress every selected layer at full rank -> (compressed model, report, Outcome)."""
    start = time.perf_counter()
    compressed, report = convfactor.compress(model, full_rank_rules(model, method), example)
    return compressed, report, _outcome(report, selected_layers(model, method), (compressed, model, example), start)


def run_macs_ratio(model: nn.Module, example: torch.Tensor, method: str, ratio: float = 0.5):
    """One rule over the selected layers at ``macs_ratio`` -> (compressed model, report, Outcome)."""
    start = time.perf_counter()
    names = selected_layers(model, method)
    rule = {**whole_model_selector(model, names), "method": method, "macs_ratio": ratio}
    compressed, report = convfactor.compress(model, [rule], example)
    return compressed, report, _outcome(report, names, (compressed, model, example), start)


@torch.no_grad()
def round_trip(compressed: nn.Module, model: nn.Module, example: torch.Tensor, directory) -> bool:
    """``convfactor.save`` then ``convfactor.load`` onto a copy of the original ``model`` whose every
    parameter and buffer is NaN (so nothing can pass unless it came from the file): is the output
    bit-identical?"""
    convfactor.save(compressed, directory)
    base = copy.deepcopy(model)
    for tensor in [*base.parameters(), *base.buffers()]:
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    again = convfactor.load(directory, base)
    return torch.equal(flat_output(again(example.clone())), flat_output(compressed(example.clone())))


def onnx_error(compressed: nn.Module, example: torch.Tensor, path) -> float:
    """Export ``compressed`` (in float32) to ONNX and return onnxruntime's relative output error."""
    from convfactor.export import check_onnx, export_model
    model32, x32 = copy.deepcopy(compressed).float().eval(), example.float()
    export_model(model32, x32, path)
    return check_onnx(path, model32, x32)["rel_error"]
