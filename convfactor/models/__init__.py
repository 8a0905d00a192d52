"""The model zoo: ``get(name, pretrained=False)`` builds a model by its lower-case name.

Pretrained weights ship inside the package (``convfactor/weights/NAME.safetensors``) for the
models listed by :func:`pretrained_names`; nothing is downloaded.  The published SR models of
:mod:`convfactor.models.published` read theirs from installed PyPI wheels (``convfactor[published]``).

``get`` also takes a spec (:mod:`convfactor.models.thirdparty`): ``torchvision:NAME``,
``timm:NAME``, ``spandrel:PATH`` (a checkpoint spandrel recognizes, with its weights; optional
extras: ``pip install 'convfactor[thirdparty]'``) or ``package.module:factory``.  Every model's
random initialisation is seeded (``seed=0`` by default, without touching torch's global
generator), so two calls give the same weights: a plan
made for ``get("resnet20")`` applies to the next ``get("resnet20")``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..utils import UnknownName, eval_mode
from . import thirdparty

__all__ = ["get", "names", "info", "pretrained_names", "register", "default_input", "check_input", "WEIGHTS_DIR",
           "training_stages"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

#: name -> ("module:factory", default input shape (one sample, C x H x W), task)
_ZOO: dict[str, tuple[str, tuple[int, ...], str]] = {
    "resnet20": ("resnet_cifar:resnet20", (3, 32, 32), "classification"),
    "resnet56": ("resnet_cifar:resnet56", (3, 32, 32), "classification"),
    "edsr_baseline_x2": ("edsr:edsr_baseline_x2", (3, 64, 64), "sr"),
    "edsr_baseline_x4": ("edsr:edsr_baseline_x4", (3, 64, 64), "sr"),
    "edsr_8_128_x2": ("edsr:edsr_8_128_x2", (3, 64, 64), "sr"),
    "edsr_x2": ("edsr:edsr_x2", (3, 64, 64), "sr"),
    "srresnet_x4": ("srresnet:srresnet_x4", (3, 64, 64), "sr"),
    "srresnet_x2": ("srresnet:srresnet_x2", (3, 64, 64), "sr"),
    "rrdbnet_x4": ("rrdbnet:rrdbnet_x4", (3, 64, 64), "sr"),
    "rrdbnet_x2": ("rrdbnet:rrdbnet_x2", (3, 64, 64), "sr"),
    "dncnn": ("dncnn:dncnn", (1, 64, 64), "denoise"),
    "dncnn_color": ("dncnn:dncnn_color", (3, 64, 64), "denoise"),
    "vgg16_cifar": ("vgg_cifar:vgg16_cifar", (3, 32, 32), "classification"),
    "densenet_bc_40_12": ("densenet:densenet_bc_40_12", (3, 32, 32), "classification"),
    "blognet": ("blognet:blognet", (3, 32, 32), "classification"),
}
#: upscaling factor of the super-resolution models (``info(name)["scale"]``)
_SCALE: dict[str, int] = {name: int(name.rsplit("_x", 1)[1]) for name, (_, _, task) in _ZOO.items() if task == "sr"}
#: published SR models whose pretrained weights come from installed PyPI wheels (published.py): name -> scale
_PUBLISHED: dict[str, int] = {"srmd_x2": 2, "srmd_x3": 3, "srmd_x4": 4, "realesrgan_x4plus": 4,
                              "realesrgan_x4plus_anime": 4, "realesr_animevideov3": 4}
_ZOO.update({name: (f"published:{name}", (3, 64, 64), "sr") for name in _PUBLISHED})
#: fine-tuning settings that suit a model better than the generic ones (measured: Adam at 2e-4 wrecks
#: the published SRMD within a few steps, 5e-6 on 48² patches improves a data-fitted copy)
_FINETUNE: dict[str, dict] = {name: {"lr": 5e-6, "patch_size": 48} for name in ("srmd_x2", "srmd_x3", "srmd_x4")}
_SCALE.update(_PUBLISHED)
_CUSTOM: dict[str, Callable[..., nn.Module]] = {}


def names() -> list[str]:
    return sorted(set(_ZOO) | set(_CUSTOM))


def pretrained_names() -> list[str]:
    from .published import installed
    return sorted(n for n in names() if (WEIGHTS_DIR / f"{n}.safetensors").is_file()
                  or (n in _PUBLISHED and installed(n)))


def register(name: str, factory: Callable[..., nn.Module], input_shape=(3, 32, 32), task: str = "other",
             scale: int | None = None) -> None:
    _CUSTOM[name] = factory
    _ZOO.setdefault(name, ("", tuple(input_shape), task))
    if scale is not None:
        _SCALE[name] = int(scale)


def training_stages(recipe: dict) -> list[dict]:
    """A weights recipe's stages, each as its full settings: the recipe's own keys (``stages`` removed)
    under each entry of ``recipe["stages"]`` (one stage, the recipe itself, when it has none)."""
    base = {k: v for k, v in recipe.items() if k != "stages"}
    return [{**base, **overrides} for overrides in recipe.get("stages") or [{}]]


def info(name: str) -> dict:
    """``{"name", "input_shape" (one sample, no batch axis; None if unknown), "task"[, "scale"][, "finetune"]}``
    (``finetune``: settings such as ``lr`` and ``patch_size`` that suit the model better than the defaults)
    (a ``spandrel:PATH`` checkpoint also gives its ``"architecture"``; its scale and input channels
    are spandrel's reading of the file)."""
    if thirdparty.is_spec(name):
        return {"name": name, **thirdparty.describe(name)}
    if name not in _ZOO:
        raise UnknownName(f"unknown model {name!r}; built-in models: {', '.join(names())}")
    _, shape, task = _ZOO[name]
    out = {"name": name, "input_shape": shape, "task": task}
    if name in _SCALE:
        out["scale"] = _SCALE[name]
    if name in _FINETUNE:
        out["finetune"] = dict(_FINETUNE[name])
    return out


def default_input(name: str, batch: int = 1):
    shape = info(name)["input_shape"]
    if shape is None:
        raise ValueError(f"{name} states no input size; give one (e.g. --input-size 1x3x224x224)")
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def _build(name: str, **kwargs) -> nn.Module:
    if thirdparty.is_spec(name):
        return thirdparty.build(name, **kwargs)
    if name in _CUSTOM:
        return _CUSTOM[name](**kwargs)
    if name not in _ZOO:
        raise UnknownName(f"unknown model {name!r}; built-in models: {', '.join(names())} "
                          "(or torchvision:NAME, timm:NAME, spandrel:PATH, package.module:factory)")
    module_name, factory = _ZOO[name][0].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), factory)(**kwargs)


def get(name: str, pretrained: bool = False, *, seed: int | None = 0, **kwargs) -> nn.Module:
    """Build the model ``name`` (a zoo name or a spec, see the module docstring) in eval mode.

    Its random initialisation draws from a generator seeded with ``seed`` (None: torch's global
    generator, as it stands), and torch's global random state is left as it was.
    ``pretrained=True`` loads the shipped weights of a zoo model; third-party weights are never
    downloaded (load your own with :func:`convfactor.load_weights`).  A ``spandrel:PATH`` model comes
    with the weights of its file (``pretrained`` changes nothing).
    """
    if pretrained and thirdparty.is_spec(name) and not thirdparty.holds_weights(name):
        raise ValueError(f"{name}: convfactor ships no weights for it and never downloads any; "
                         "load your own with --weights FILE (convfactor.load_weights)")
    if pretrained and name in _PUBLISHED and name not in _CUSTOM:    # the factory reads its wheel's weights
        kwargs, pretrained = {**kwargs, "pretrained": True}, False
    if seed is None:
        model = _build(name, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _build(name, **kwargs)
    if pretrained and not thirdparty.is_spec(name):
        file = WEIGHTS_DIR / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"no shipped weights for {name!r} (models with weights: "
                                    f"{', '.join(pretrained_names()) or 'none'})")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(file)))
    return model.eval()


def check_input(model: nn.Module, example: torch.Tensor) -> None:
    """Run ``model`` once on a copy of ``example`` (eval mode, no grad); a model that cannot take an
    input of that size gives a one-line ValueError naming the size instead of a traceback deep
    inside a layer (e.g. ``1x4x32x32`` on an RGB model)."""
    size = "x".join(str(v) for v in example.shape)
    try:
        with torch.no_grad(), eval_mode(model):
            model(example.clone())
    except Exception as exc:  # noqa: BLE001 - any failure of the forward is the input's fault here
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise ValueError(f"the model does not run on an input of size {size}{_stem_hint(model, example)} "
                         f"({reason})") from exc


def _stem_hint(model: nn.Module, example: torch.Tensor) -> str:
    """``"; its first conv X takes C channels"`` when the example's channel count differs from it."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None or example.dim() < 2 or example.shape[1] == first[1].in_channels:
        return ""
    return f"; its first conv {first[0]} takes {first[1].in_channels} input channels, not {example.shape[1]}"
