"""Safe save / load.

A compressed model is stored as a *directory*::

    OUT/recipe.json        per factorized layer: method, ranks, conv spec, options; the exact merges
                           of :func:`convfactor.merge` ("merged": the modules each put where)
    OUT/model.safetensors  every tensor of the state dict (shared tensors stored once)

and rebuilt from the original architecture: :func:`load` deep-copies ``base_model``, swaps in empty
replacements built from the recipe, then loads the tensors.  No pickle is involved, so loading
never executes code.  Writes are atomic (a temporary sibling, then ``os.replace``), and nothing is
written when validation fails.

Outputs are never replaced by surprise: :func:`check_output` refuses an existing output unless the
caller asks to overwrite it, and writing into an existing directory replaces only the files
convfactor writes there (a user's other files are kept).  Inputs fail with one line naming the file:
a corrupt safetensors file, or weights of another architecture (:func:`load_weights`).  The generic
file helpers (atomic writes, output checks, the YAML/JSON reader) are :mod:`convfactor.files`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import models
from .files import check_output, read_safetensors, temporary_sibling_dir
from .spec.convspec import ConvSpec
from .compression.batchnorm import folded_of, restore_folds
from .compression.merge import merge_records, replay_merges
from .compression.surgery import set_submodule
from .methods import registry
from .methods.base import Factorized

__all__ = ["save", "load", "load_weights", "recipe_of", "base_model_of", "check_model_output", "nonfinite_parameters"]

FORMAT = "convfactor"
VERSION = 1
#: the files :func:`save` writes into a model directory (the only ones it ever replaces there)
MODEL_FILES = ("model.safetensors", "recipe.json")


def recipe_of(model: nn.Module) -> dict:
    return {name: m.recipe() for name, m in model.named_modules() if isinstance(m, Factorized)}


def base_model_of(source: str | os.PathLike) -> str | None:
    """The base model ``source`` was built from, as :func:`convfactor.models.get` names it.

    A convfactor model directory (one holding a ``recipe.json``): the model its metadata records
    (``save(..., metadata={"model": ...})``), or None when it records none.  Anything else: ``source``
    itself when it names a model (a zoo name, ``torchvision:NAME``, ``timm:NAME``, ``spandrel:PATH``
    or ``package.module:factory``), else None (e.g. a weights file, a missing path).
    """
    recipe = Path(source) / "recipe.json"
    if recipe.is_file():
        metadata = json.loads(recipe.read_text()).get("metadata") or {}
        return metadata.get("model")
    name = os.fspath(source)
    return name if name in models.names() or models.thirdparty.is_spec(name) else None






def check_model_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """:func:`check_output` for a model directory (:func:`save`): a non-empty directory must also be a
    convfactor model directory (hold a ``recipe.json``), whatever ``overwrite`` says: checked first, so
    the message never suggests an ``--overwrite`` that would then be refused."""
    given = Path(path)
    if given.is_dir() and any(given.iterdir()) and not (given / "recipe.json").is_file():
        raise FileExistsError(f"{given} holds other files and is not a convfactor model directory (no recipe.json); "
                              "refusing to write into it, even with --overwrite: give a new or empty directory, "
                              "or one convfactor wrote")
    return check_output(path, overwrite=overwrite, directory=True)




def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared storage kept once (safetensors refuses aliases)."""
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
         overwrite: bool = True) -> Path:
    """Write ``model`` (compressed or not) to the directory ``path``; returns the path.

    A new directory appears whole (built as a temporary sibling, then renamed).  An existing
    convfactor model directory is written into only with ``overwrite``: :data:`MODEL_FILES` are
    replaced one by one (each atomically, the recipe last) and every other file there is kept.  A
    non-empty directory that is not a convfactor model directory is never written into.

    ``metadata["model"]``, the base model, is recorded as :func:`convfactor.models.get` can build it
    again: a ``spandrel:PATH`` base as its resolved path and sha256 (``spandrel:/abs/PATH#sha256=HEX``),
    which :func:`base_model_of` gives back and which refuses a file that is gone or changed.
    """
    path = check_model_output(path, overwrite=overwrite)
    metadata = dict(metadata or {})
    if isinstance(metadata.get("model"), str):
        metadata["model"] = models.thirdparty.pinned(metadata["model"])
    recipe = {"format": FORMAT, "version": VERSION, "layers": recipe_of(model), "metadata": metadata,
              "shared": _shared_names(model), "folded_bn": folded_of(model), "merged": merge_records(model)}
    tmp = temporary_sibling_dir(path)
    try:
        save_file(_unique_state(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
        if path.exists():
            for name in MODEL_FILES:                    # the recipe last: it names what the tensors are
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _shared_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that alias one tensor (e.g. a shared filter basis)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load(path: str | os.PathLike, base_model: nn.Module) -> nn.Module:
    """Rebuild a model saved by :func:`save` on a copy of ``base_model`` (its architecture)."""
    path = Path(path)
    if not (path / "recipe.json").is_file():
        raise FileNotFoundError(f"{path} is not a convfactor model directory (no recipe.json)")
    recipe = json.loads((path / "recipe.json").read_text())
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{path}/recipe.json is not a convfactor recipe")
    model = copy.deepcopy(base_model)
    restore_folds(model, recipe.get("folded_bn", {}))          # BatchNorms folded away by compress
    merged = recipe.get("merged", [])                          # absent in recipes written before merging
    moved = {p for entry in merged for p in [*entry.get("demoted", {}), *entry["slots"]]}
    layers = sorted(recipe["layers"].items(), key=lambda kv: kv[0].count("."))
    after = [(n, e) for n, e in layers if any(n == p or n.startswith(p + ".") for p in moved)]
    for name, entry in layers:                # layers factorized after a merge wait until it is replayed
        if (name, entry) not in after:
            set_submodule(model, name, _rebuilt_layer(model, name, entry))
    replay_merges(model, merged, lambda name, entry: _rebuilt_layer(model, name, entry))
    for name, entry in after:
        set_submodule(model, name, _rebuilt_layer(model, name, entry))
    _tie(model, recipe.get("shared", []))
    state = read_safetensors(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliased = {n for group in recipe.get("shared", []) for n in group[1:]}
    missing = [m for m in missing if m not in aliased]
    if missing or unexpected:
        raise ValueError(f"state does not match the rebuilt model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model


def _rebuilt_layer(model: nn.Module, name: str, entry: dict) -> Factorized:
    """The empty replacement of layer ``name`` of ``model`` that a recipe entry describes, checked
    against the layer there."""
    try:
        original = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"recipe names layer {name!r}, which the base model does not have") from None
    spec = ConvSpec.from_dict(entry["spec"])
    if not isinstance(original, Factorized) and ConvSpec.from_module(original) != spec:
        raise ValueError(f"layer {name!r} of the base model does not match the recipe's spec")
    return _empty_layer(entry, spec, original)


def _empty_layer(entry: dict, spec: ConvSpec, original: nn.Module) -> Factorized:
    """The uninitialized replacement a recipe entry describes, in ``original``'s dtype and device.

    ``entry["options"]`` is the configured method's recipe (its fields), so the method is rebuilt
    with them; recipes written before methods were dataclasses hold a subset, which is enough.
    """
    method = registry.get(entry["method"], **entry.get("options", {}))
    weight = None if isinstance(original, Factorized) else original.weight     # else a conv or Linear
    return method.build(spec, tuple(entry["ranks"]), None, dtype=None if weight is None else weight.dtype,
                        device=None if weight is None else weight.device)


def _tie(model: nn.Module, shared: list[list[str]]) -> None:
    """Make every name of a shared group point at the first one's Parameter."""
    for names in shared:
        first_owner, _, first_attr = names[0].rpartition(".")
        param = getattr(model.get_submodule(first_owner), first_attr)
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)






def _read_state(file: Path, trust_pickle: bool) -> dict:
    """The state dict stored in ``file`` (safetensors, a plain state dict, or with ``trust_pickle`` a
    pickled model or checkpoint holding one)."""
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    try:
        with warnings.catch_warnings():     # torch's "pickle protocol" UserWarning, before a refusal or not
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError subclasses, RuntimeError, ...
        if "weights only load failed" not in str(exc).lower():
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ValueError(f"{file} is not a PyTorch weights file ({reason})") from None
        if not trust_pickle:
            raise ValueError(f"{file} is not a plain state dict (it needs pickle to load, which can run "
                             f"arbitrary code); pass --trust-pickle (trust_pickle=True) only for files "
                             f"you trust") from exc
        state = torch.load(file, map_location="cpu", weights_only=False)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (it holds a {type(state).__name__})")
    return state


def _names(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def fit_problems(model: nn.Module, state: dict) -> str | None:
    """One line summarising why ``state`` does not load into ``model`` (missing keys, unexpected keys,
    shape mismatches), or None when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and (not isinstance(state[k], torch.Tensor)
                                                    or tuple(state[k].shape) != tuple(own[k].shape))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        k = mismatched[0]
        got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        parts.append(f"{len(mismatched)} shape mismatches (first: {k} is {got} in the file, "
                     f"{tuple(own[k].shape)} in the model)")
    return ", ".join(parts) or None


def nonfinite_parameters(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the parameters holding NaN or infinite values, and of the floating buffers holding NaN
    (a buffer may hold -inf on purpose, e.g. an attention mask); of ``state`` if given, else of ``model``."""
    state = model.state_dict() if state is None else state
    params = {n for n, _ in model.named_parameters()}

    def bad(name: str, t: torch.Tensor) -> bool:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return False
        return not bool(torch.isfinite(t).all()) if name in params else bool(torch.isnan(t).any())
    return [n for n, t in state.items() if bad(n, t)]


def load_weights(model: nn.Module, file: str | os.PathLike, *, trust_pickle: bool = False,
                 name: str | None = None) -> nn.Module:
    """Load original (uncompressed) weights into ``model`` in place and return it.

    ``.safetensors`` files and plain state dicts (``torch.load(weights_only=True)``) are accepted.
    A pickled full model executes code when loaded, so it is refused unless ``trust_pickle``.
    A convfactor directory (``recipe.json``) is loaded with :func:`load` instead.  Weights that do not
    fit (another architecture: ``name`` names the model in the message), a corrupt file and NaN or
    infinite weights are each one ValueError line, and ``model`` is left unchanged.
    """
    file = Path(file)
    if file.is_dir():
        return load(file, model)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    state = _read_state(file, trust_pickle)
    if state and all(k.startswith("module.") for k in state):          # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    problems = fit_problems(model, state)
    if problems:
        raise ValueError(f"weights in {file.name} do not fit {name or type(model).__name__}: {problems}")
    bad = nonfinite_parameters(model, state)
    if bad:
        raise ValueError(f"weights in {file.name} hold NaN or infinite values in {_names(bad, 2)} "
                         f"({len(bad)} tensors); convfactor needs finite weights")
    model.load_state_dict(state)
    return model
