"""Models named by a *spec* string instead of a zoo name: ``torchvision:NAME``, ``timm:NAME`` and
``package.module:factory``.

Third-party weights are always randomly initialised (torchvision ``weights=None`` and
``weights_backbone=None``, timm ``pretrained=False``): nothing is downloaded.  A user's trained
weights come afterwards, from their own state dict (``convfactor.load_weights`` / ``--weights``).
:func:`convfactor.models.get` seeds the initialisation, so the same spec gives the same weights.

torchvision and timm are optional (``pip install 'convfactor[thirdparty]'``).  Every failure to
find or import a model is a one-line :class:`ValueError` (or :class:`~convfactor.utils.UnknownName`
for a name the library does not know), never a traceback from deep inside the import.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from ..utils import UnknownName

__all__ = ["is_spec", "build", "facts", "input_shape", "task", "import_library", "LIBRARIES", "INSTALL_HINT"]

#: spec prefixes that name a model of a library (rather than ``package.module:factory``)
LIBRARIES = ("torchvision", "timm")
INSTALL_HINT = "pip install 'convfactor[thirdparty]'"


def is_spec(name: str) -> bool:
    """Whether ``name`` is a spec (``library:NAME`` or ``package.module:factory``), not a zoo name."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str]:
    prefix, _, rest = spec.partition(":")
    if not prefix or not rest:
        raise ValueError(f"model {spec!r}: expected 'torchvision:NAME', 'timm:NAME' or 'package.module:factory'")
    return prefix, rest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_library(package: str):
    """``import package`` (torchvision or timm), or a one-line ValueError saying why it failed.

    On a machine whose torchvision was built for another torch, its compiled ops do not load
    (``operator torchvision::nms does not exist``); the message then says so instead of the
    import's traceback.  Nothing is patched here: the tests' shim (``tests/thirdparty.py``) is not
    part of the library.
    """
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name in (package, "torchvision", "timm"):
            raise ValueError(f"{exc.name} is not installed ({INSTALL_HINT})") from None
        raise ValueError(f"{package} could not be imported ({_first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install surfaces as any error type
        import torch
        raise ValueError(f"{package} could not be imported ({_first_line(exc)}); install the torchvision "
                         f"release built for this torch ({torch.__version__})") from exc


def _unknown(library: str, name: str, known: list[str]) -> UnknownName:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownName(f"unknown {library} model {name!r}{hint} ({len(known)} models are known)")


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's builder ``name`` with no weights, for the backbone either."""
    models = import_library("torchvision").models
    known = models.list_models()
    if name not in known:
        raise _unknown("torchvision", name, known)
    builder = models.get_model_builder(name)
    options = {"weights": None, **kwargs}
    if "weights_backbone" in inspect.signature(builder).parameters:
        options.setdefault("weights_backbone", None)
    if options["weights"] is not None or options.get("weights_backbone") is not None:
        raise ValueError("convfactor never downloads weights; load your own with --weights / convfactor.load_weights")
    return builder(**options)


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``."""
    timm = import_library("timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    if kwargs.get("pretrained"):
        raise ValueError("convfactor never downloads weights; load your own with --weights / convfactor.load_weights")
    return timm.create_model(name, **{**kwargs, "pretrained": False})


def _factory(spec: str):
    """The callable ``package.module:attr.path`` names, with one-line errors."""
    module_name, attr = _split(spec)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name} ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise ValueError(f"cannot import {module_name} ({_first_line(exc)})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def _factory_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = _factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory: report it in one line, keep the cause
        raise ValueError(f"{spec}: building the model failed ({_first_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build(spec: str, **kwargs) -> nn.Module:
    """The (randomly initialised, unseeded) model of ``spec``; ``kwargs`` go to its builder.

    ``torchvision:resnet18`` -> ``torchvision.models.get_model("resnet18", weights=None)``;
    ``timm:convnext_atto`` -> ``timm.create_model("convnext_atto", pretrained=False)``;
    ``package.module:factory`` -> ``package.module.factory(**kwargs)``.
    """
    prefix, name = _split(spec)
    if prefix == "torchvision":
        return _torchvision_model(name, kwargs)
    if prefix == "timm":
        return _timm_model(name, kwargs)
    return _factory_model(spec, kwargs)


def _torchvision_facts(name: str) -> tuple[tuple[int, ...] | None, str]:
    """(input shape of one sample, task) from torchvision's weights metadata; no download."""
    models = import_library("torchvision").models
    if name not in models.list_models():
        raise _unknown("torchvision", name, models.list_models())
    families = {"classification": models, "segmentation": models.segmentation, "video": models.video}
    task = next((t for t, mod in families.items() if name in models.list_models(module=mod)), "other")
    transforms = list(models.get_model_weights(name))[0].transforms()
    side = getattr(transforms, "crop_size", None) or getattr(transforms, "resize_size", None)
    if task == "other" or not side:
        return None, task
    hw = (side[0], side[-1])
    return ((3, 16, *hw) if task == "video" else (3, *hw)), task


def facts(spec: str) -> tuple[tuple[int, ...] | None, str]:
    """``(input_shape(spec), task(spec))`` with one look-up."""
    prefix, name = _split(spec)
    if prefix == "torchvision":
        return _torchvision_facts(name)
    if prefix == "timm":
        timm = import_library("timm")
        if not timm.is_model(name):
            raise _unknown("timm", name, timm.list_models())
        cfg = timm.models.get_pretrained_cfg(name)
        return (tuple(cfg.input_size) if cfg is not None and cfg.input_size else None), "classification"
    return None, "other"


def input_shape(spec: str) -> tuple[int, ...] | None:
    """The input shape of one sample (C x H x W, or C x T x H x W for video) the model's library
    states for it, or None when it states none (``package.module:factory``: always None)."""
    return facts(spec)[0]


def task(spec: str) -> str:
    """``classification`` (torchvision's classification models, every timm model), ``segmentation``,
    ``video`` or ``other``."""
    return facts(spec)[1]
