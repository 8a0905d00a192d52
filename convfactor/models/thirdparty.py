"""Models named by a *spec* string instead of a zoo name: ``torchvision:NAME``, ``timm:NAME``,
``spandrel:PATH`` and ``package.module:factory``.

Third-party weights are always randomly initialised (torchvision ``weights=None`` and
``weights_backbone=None``, timm ``pretrained=False``): nothing is downloaded.  A user's trained
weights come afterwards, from their own state dict (``convfactor.load_weights`` / ``--weights``).
:func:`convfactor.models.get` seeds the initialisation, so the same spec gives the same weights.

``spandrel:PATH`` is the exception: the checkpoint at PATH (``.safetensors``, or a ``.pth``/``.pt``/
``.ckpt`` state dict read with ``torch.load(weights_only=True)``: a pickle that needs code is refused)
holds the weights, and spandrel tells its architecture, scale and input channels from them.  A
compressed model records its base as ``spandrel:/absolute/path#sha256=HEX`` (:func:`pinned`); that
spec refuses a file that is gone or whose contents changed.

torchvision, timm and spandrel are optional (``pip install 'convfactor[thirdparty]'``).  Every
failure to find or import a model is a one-line :class:`ValueError` (:class:`OSError` for a missing
file, :class:`~convfactor.utils.UnknownName` for a name the library does not know), never a
traceback from deep inside the import.

Where torchvision was built for another torch, its compiled ops do not load and ``import
torchvision`` (so timm and spandrel too) fails with ``operator torchvision::nms does not exist``.
The model definitions are pure Python: :func:`import_library` then defines the ops' *schemas*
(:data:`TORCHVISION_SCHEMAS`, no kernels, so a model that really calls nms still fails loudly),
imports again and says so in one line on stderr.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import re
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from ..utils import UnknownName

__all__ = ["is_spec", "build", "facts", "describe", "input_shape", "task", "pinned", "holds_weights", "import_library",
           "torchvision_ops_missing", "define_torchvision_standins", "TORCHVISION_SCHEMAS", "LIBRARIES",
           "INSTALL_HINT"]

#: spec prefixes that name a model of a library (rather than ``package.module:factory``)
LIBRARIES = ("torchvision", "timm", "spandrel")
INSTALL_HINT = "pip install 'convfactor[thirdparty]'"

#: torchvision's operator schemas (from its C++ registrations): defined, without kernels, only where its
#: compiled library does not load (:func:`define_torchvision_standins`)
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_STANDINS: list = []          # keeps the torch.library.Library objects (and so their definitions) alive


def is_spec(name: str) -> bool:
    """Whether ``name`` is a spec (``library:NAME``, ``spandrel:PATH`` or ``package.module:factory``),
    not a zoo name."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str]:
    prefix, _, rest = spec.partition(":")
    if not prefix or not rest:
        raise ValueError(f"model {spec!r}: expected 'torchvision:NAME', 'timm:NAME', 'spandrel:PATH' "
                         "or 'package.module:factory'")
    return prefix, rest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def torchvision_ops_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is torchvision's compiled ops failing to load next to this torch
    (``RuntimeError: operator torchvision::nms does not exist``), and nothing else."""
    return isinstance(exc, RuntimeError) and bool(re.search(r"operator torchvision::\w+ does not exist", str(exc)))


def _defined(op: str) -> bool:
    return hasattr(torch.ops.torchvision, op)


def define_torchvision_standins() -> int:
    """Define the schemas of torchvision's ops that are not defined (no kernels: calling one fails);
    returns how many were defined (0 where torchvision's own library has loaded them)."""
    missing = [s for s in TORCHVISION_SCHEMAS if not _defined(s.split("(", 1)[0])]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing:
            lib.define(schema)
        _STANDINS.append(lib)
    return len(missing)


def _prepare_retry(exc: BaseException, before: set[str], package: str) -> bool:
    """After ``import package`` failed with ``exc``: when torchvision's compiled ops are the cause (and
    stand-ins are not defined yet), forget the half-imported modules, define the stand-ins, say so on
    stderr and return True (import again); else False."""
    if not torchvision_ops_missing(exc) or _STANDINS:
        return False
    tops = {"torchvision", package.split(".")[0]}
    for name in [m for m in sys.modules if m not in before and m.split(".")[0] in tops]:
        del sys.modules[name]
    if define_torchvision_standins():
        print(f"note: torchvision's compiled ops are unavailable (built for another torch than {torch.__version__}); "
              "defined their schemas without kernels, so detection ops such as nms fail if called", file=sys.stderr)
    return True


def import_library(package: str):
    """``import package`` (torchvision, timm or spandrel), or a one-line ValueError saying why it failed.

    On a machine whose torchvision was built for another torch, its compiled ops do not load
    (``operator torchvision::nms does not exist``): the ops' schemas are then defined without kernels
    (:func:`define_torchvision_standins`, one note on stderr) and the import is tried again.  Any
    other failure is one line instead of the import's traceback.
    """
    before = set(sys.modules)
    try:
        try:
            return importlib.import_module(package)
        except RuntimeError as exc:
            if not _prepare_retry(exc, before, package):
                raise
            return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name in (package, "torchvision", "timm", "spandrel"):
            raise ValueError(f"{exc.name} is not installed ({INSTALL_HINT})") from None
        raise ValueError(f"{package} could not be imported ({_first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - a broken install surfaces as any error type
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


def _path_hint(module_name: str) -> str:
    """A hint when ``module_name`` lives in the current folder, which a console script does not search."""
    top = module_name.split(".")[0]
    if Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file():
        return (f"; {top} is in the current folder, which the convfactor command does not search: run it as "
                f"PYTHONPATH=. convfactor ... or python -m convfactor ...")
    return ""


def _factory(spec: str):
    """The callable ``package.module:attr.path`` names, with one-line errors."""
    module_name, attr = _split(spec)
    before = set(sys.modules)
    try:
        try:
            obj = importlib.import_module(module_name)
        except RuntimeError as exc:                 # e.g. spandrel.architectures.X, which imports torchvision
            if not _prepare_retry(exc, before, module_name):
                raise
            obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import {module_name} ({_first_line(exc)}){_path_hint(module_name)}") from None
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


# ------------------------------------------------------------------ spandrel:PATH
#: ``PATH#sha256=HEX``: a checkpoint pinned to its contents (:func:`pinned`)
_PIN = re.compile(r"(?P<path>.+)#sha256=(?P<digest>[0-9a-f]{64})")
#: default input side (the LR side of an SR model), as the zoo's SR models take
_SPANDREL_SIDE = 64
#: sha256 of a checkpoint -> its facts (:func:`describe`), so ``info`` after ``get`` detects nothing again
_SPANDREL_FACTS: dict[str, dict] = {}


def _spandrel_file(spec: str) -> tuple[Path, str | None]:
    """The checkpoint ``spandrel:PATH[#sha256=HEX]`` names (resolved) and its pinned sha256 (or None);
    a missing file or a directory is one line."""
    rest = _split(spec)[1]
    pin = _PIN.fullmatch(rest)
    path = Path(pin["path"] if pin else rest).expanduser().resolve()
    if not path.exists():
        if pin:
            raise FileNotFoundError(f"{path} is gone: a model was compressed from it (spandrel:{path}); put the "
                                    "file back, or compress the model again")
        raise FileNotFoundError(f"spandrel checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"spandrel:{rest} is a directory; give a checkpoint file (.safetensors, .pth, "
                                ".pt or .ckpt)")
    return path, pin["digest"] if pin else None


def _spandrel_bytes(spec: str) -> tuple[Path, bytes, str]:
    """(file, its bytes, their sha256) of ``spec``; a pinned spec whose file changed is one line."""
    path, pin = _spandrel_file(spec)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if pin is not None and digest != pin:
        raise ValueError(f"{path} has changed since a model was compressed from it (sha256 {pin[:12]}... recorded, "
                         f"{digest[:12]}... now); restore that file, or compress the model again")
    return path, data, digest


def _spandrel_state(path: Path, data: bytes) -> dict:
    """The state dict in a checkpoint's bytes: safetensors, or ``torch.load(weights_only=True)`` (a
    pickle that needs code to load is refused, never run)."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path} is not a valid safetensors file ({_first_line(exc)})") from None
    try:
        state = torch.load(BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError subclasses, RuntimeError, ...
        raise ValueError(_unreadable_checkpoint(path, exc)) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (it holds a {type(state).__name__})")
    return state


def _unreadable_checkpoint(path: Path, exc: BaseException) -> str:
    """One line for a checkpoint ``torch.load(weights_only=True)`` refused: one that names code to run
    (a pickled object; never loaded), or one that is no PyTorch checkpoint at all."""
    text = str(exc)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return (f"{path} is not a plain state dict: it needs pickle to run code to load ({code[1]}), so it is "
                "refused; save the model's state_dict() as .safetensors or .pth")
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    reason = detail[1].strip() if detail else _first_line(exc)
    return f"{path} is not a PyTorch checkpoint ({reason[:160]})"


def _spandrel_facts_of(descriptor) -> dict:
    """``{"input_shape", "task", "scale", "architecture"}`` of a spandrel model descriptor; the input side
    is 64 or more, as its size requirements ask."""
    need = descriptor.size_requirements
    side = max(_SPANDREL_SIDE, need.minimum)
    side = -(-side // need.multiple_of) * need.multiple_of
    return {"input_shape": (descriptor.input_channels, side, side), "task": "sr" if descriptor.scale > 1 else "other",
            "scale": descriptor.scale, "architecture": descriptor.architecture.name}


def _spandrel_descriptor(path: Path, data: bytes, digest: str):
    """spandrel's model descriptor of a checkpoint's bytes (:func:`_spandrel_bytes`); its facts are cached
    by the sha256."""
    state = _spandrel_state(path, data)
    spandrel = import_library("spandrel")
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        keys = list(state)
        shown = ", ".join(map(str, keys[:3])) + (", ..." if len(keys) > 3 else "")
        raise ValueError(f"spandrel {spandrel.__version__} does not recognize the architecture in {path} "
                         f"({len(keys)} key{'' if len(keys) == 1 else 's'}: {shown})") from None
    except Exception as exc:  # noqa: BLE001 - an architecture's loader may fail in any way on odd shapes
        raise ValueError(f"spandrel could not load {path} ({_first_line(exc)[:160]})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ValueError(f"{path} holds a {descriptor.architecture.name} model that takes an image and a mask; "
                         "convfactor compresses models of one input")
    _SPANDREL_FACTS[digest] = _spandrel_facts_of(descriptor)
    return descriptor


def _spandrel_facts(spec: str) -> dict:
    """:func:`describe` of ``spandrel:PATH`` (detecting the architecture only when this file's contents
    have not been seen)."""
    path, data, digest = _spandrel_bytes(spec)
    if digest not in _SPANDREL_FACTS:
        _spandrel_descriptor(path, data, digest)
    return dict(_SPANDREL_FACTS[digest])


def _spandrel_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    if kwargs:
        raise ValueError(f"{spec}: a spandrel checkpoint takes no keyword arguments (got {', '.join(kwargs)}); "
                         "spandrel reads the architecture from the file")
    return _spandrel_descriptor(*_spandrel_bytes(spec)).model


def holds_weights(spec: str) -> bool:
    """Whether the spec's model comes with its trained weights (``spandrel:PATH``: the file's), rather than
    a random initialisation."""
    return is_spec(spec) and spec.partition(":")[0] == "spandrel"


def pinned(spec: str) -> str:
    """``spec`` as a saved model records its base: ``spandrel:PATH`` becomes
    ``spandrel:/resolved/PATH#sha256=HEX`` (built again only from the same file with the same contents);
    any other name or spec is returned as it is."""
    if not holds_weights(spec):
        return spec
    path, _, digest = _spandrel_bytes(spec)
    return f"spandrel:{path}#sha256={digest}"


def build(spec: str, **kwargs) -> nn.Module:
    """The (randomly initialised, unseeded) model of ``spec``; ``kwargs`` go to its builder.

    ``torchvision:resnet18`` -> ``torchvision.models.get_model("resnet18", weights=None)``;
    ``timm:convnext_atto`` -> ``timm.create_model("convnext_atto", pretrained=False)``;
    ``spandrel:PATH`` -> the model spandrel detects in the checkpoint PATH, with its weights;
    ``package.module:factory`` -> ``package.module.factory(**kwargs)``.
    """
    prefix, name = _split(spec)
    if prefix == "spandrel":
        return _spandrel_model(spec, kwargs)
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
    if prefix == "spandrel":
        found = _spandrel_facts(spec)
        return found["input_shape"], found["task"]
    if prefix == "torchvision":
        return _torchvision_facts(name)
    if prefix == "timm":
        timm = import_library("timm")
        if not timm.is_model(name):
            raise _unknown("timm", name, timm.list_models())
        cfg = timm.models.get_pretrained_cfg(name)
        return (tuple(cfg.input_size) if cfg is not None and cfg.input_size else None), "classification"
    return None, "other"


def describe(spec: str) -> dict:
    """``{"input_shape", "task"}`` of ``spec`` (see :func:`facts`); for ``spandrel:PATH`` also ``"scale"`` and
    ``"architecture"``, from spandrel's descriptor (task ``sr`` when the scale is above 1, else ``other``)."""
    if _split(spec)[0] == "spandrel":
        return _spandrel_facts(spec)
    shape, kind = facts(spec)
    return {"input_shape": shape, "task": kind}


def input_shape(spec: str) -> tuple[int, ...] | None:
    """The input shape of one sample (C x H x W, or C x T x H x W for video) the model's library
    states for it, or None when it states none (``package.module:factory``: always None)."""
    return facts(spec)[0]


def task(spec: str) -> str:
    """``classification`` (torchvision's classification models, every timm model), ``segmentation``,
    ``video``, ``sr`` (a spandrel checkpoint that upscales) or ``other``."""
    return facts(spec)[1]
