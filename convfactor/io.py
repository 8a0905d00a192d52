"""Safe save / load.

A compressed model is stored as a *directory*::

    OUT/recipe.json        per factorized layer: method, ranks, conv spec, options
    OUT/model.safetensors  every tensor of the state dict (shared tensors stored once)

and rebuilt from the original architecture: :func:`load` deep-copies ``base_model``, swaps in empty
replacements built from the recipe, then loads the tensors.  No pickle is involved, so loading
never executes code.  Writes are atomic (a temporary sibling, then ``os.replace``), and nothing is
written when validation fails.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .spec.convspec import ConvSpec
from .compression.surgery import set_submodule
from .methods import registry
from .methods.base import Factorized

__all__ = ["save", "load", "load_weights", "recipe_of", "atomic_write", "check_writable"]

FORMAT = "convfactor"
VERSION = 1


def recipe_of(model: nn.Module) -> dict:
    return {name: m.recipe() for name, m in model.named_modules() if isinstance(m, Factorized)}


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any work) if ``path``'s parent directory is missing or not writable."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OSError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OSError(f"cannot write {path}: directory {parent} is not writable")
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file via a temporary sibling and ``os.replace``."""
    path = check_writable(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model`` (compressed or not) to the directory ``path`` atomically; returns the path."""
    path = check_writable(path)
    if path.exists() and not (path / "recipe.json").exists():
        raise FileExistsError(f"{path} exists and is not a convfactor model directory; refusing to overwrite")
    recipe = {"format": FORMAT, "version": VERSION, "layers": recipe_of(model), "metadata": metadata or {},
              "shared": _shared_names(model)}
    tmp = Path(tempfile.mkdtemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        save_file(_unique_state(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    for name, entry in sorted(recipe["layers"].items(), key=lambda kv: kv[0].count(".")):
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"recipe names layer {name!r}, which the base model does not have") from None
        spec = ConvSpec.from_dict(entry["spec"])
        if not isinstance(original, Factorized) and ConvSpec.from_module(original) != spec:
            raise ValueError(f"layer {name!r} of the base model does not match the recipe's spec")
        set_submodule(model, name, _empty_layer(entry, spec, original))
    _tie(model, recipe.get("shared", []))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliased = {n for group in recipe.get("shared", []) for n in group[1:]}
    missing = [m for m in missing if m not in aliased]
    if missing or unexpected:
        raise ValueError(f"state does not match the rebuilt model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model


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


def load_weights(model: nn.Module, file: str | os.PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Load original (uncompressed) weights into ``model`` in place and return it.

    ``.safetensors`` files and plain state dicts (``torch.load(weights_only=True)``) are accepted.
    A pickled full model executes code when loaded, so it is refused unless ``trust_pickle``.
    A convfactor directory (``recipe.json``) is loaded with :func:`load` instead.
    """
    file = Path(file)
    if file.is_dir():
        return load(file, model)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError subclasses
            if not trust_pickle:
                raise ValueError(f"{file} is not a plain state dict (it needs pickle to load, which can run "
                                 f"arbitrary code); pass --trust-pickle (trust_pickle=True) only for files "
                                 f"you trust") from exc
            state = torch.load(file, map_location="cpu", weights_only=False)
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    model.load_state_dict(state)
    return model
