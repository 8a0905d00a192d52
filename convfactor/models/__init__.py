"""The model zoo: ``get(name, pretrained=False)`` builds a model by its lower-case name.

Pretrained weights ship inside the package (``convfactor/weights/NAME.safetensors``) for the
models listed by :func:`pretrained_names`; nothing is downloaded.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from torch import nn

from ..utils import UnknownName

__all__ = ["get", "names", "info", "pretrained_names", "register", "default_input", "WEIGHTS_DIR"]

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
_CUSTOM: dict[str, Callable[..., nn.Module]] = {}


def names() -> list[str]:
    return sorted(set(_ZOO) | set(_CUSTOM))


def pretrained_names() -> list[str]:
    return sorted(n for n in names() if (WEIGHTS_DIR / f"{n}.safetensors").is_file())


def register(name: str, factory: Callable[..., nn.Module], input_shape=(3, 32, 32), task: str = "other",
             scale: int | None = None) -> None:
    _CUSTOM[name] = factory
    _ZOO.setdefault(name, ("", tuple(input_shape), task))
    if scale is not None:
        _SCALE[name] = int(scale)


def info(name: str) -> dict:
    if name not in _ZOO:
        raise UnknownName(f"unknown model {name!r}; built-in models: {', '.join(names())}")
    _, shape, task = _ZOO[name]
    out = {"name": name, "input_shape": shape, "task": task}
    if name in _SCALE:
        out["scale"] = _SCALE[name]
    return out


def default_input(name: str, batch: int = 1):
    import torch
    return torch.randn(batch, *info(name)["input_shape"], generator=torch.Generator().manual_seed(0))


def get(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the model ``name``; ``pretrained=True`` loads its shipped weights."""
    if name in _CUSTOM:
        model = _CUSTOM[name](**kwargs)
    else:
        if name not in _ZOO:
            raise UnknownName(f"unknown model {name!r}; built-in models: {', '.join(names())}")
        module_name, factory = _ZOO[name][0].split(":")
        model = getattr(importlib.import_module(f"{__name__}.{module_name}"), factory)(**kwargs)
    if pretrained:
        file = WEIGHTS_DIR / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"no shipped weights for {name!r} (models with weights: "
                                    f"{', '.join(pretrained_names()) or 'none'})")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(file)))
    return model.eval()
