"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds::

    DIR/ckpt-STEP.safetensors   model state ("model.*") and optimizer tensors ("optim.*")
    DIR/latest.json             {"step", "tensors": "ckpt-STEP.safetensors", "optim": {...}, "extra": {...}}

Both files are written atomically (temporary sibling + ``os.replace``); ``latest.json`` is written
last and is the commit point, so a run killed at any moment leaves the previous checkpoint valid.
Older tensor files are removed after the new pointer is in place.  Loading never unpickles.

Optimizer state dicts (``{"state": {i: {k: tensor|number|None}}, "param_groups": [...]}``) are
flattened: tensors go to ``optim.state.I.KEY``, the rest to JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "latest_step", "flatten_optimizer_state",
           "unflatten_optimizer_state"]

POINTER = "latest.json"


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors by flat name, JSON-able remainder)."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for idx, entry in state_dict["state"].items():
        plain: dict = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                name = f"optim.state.{idx}.{key}"
                tensors[name] = value.detach().cpu().contiguous().clone()
                plain[key] = {"tensor": name}
            else:
                plain[key] = {"value": value}
        plain_state[str(idx)] = plain
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    keep: int = 1) -> Path:
    """Write the checkpoint for ``step`` atomically; keeps the newest ``keep`` tensor files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta: dict = {"step": int(step), "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, meta["optim"] = flatten_optimizer_state(optimizer.state_dict())
        tensors.update(opt_tensors)
    name = f"ckpt-{int(step):08d}.safetensors"
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "convfactor-checkpoint", "step": str(step)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    meta["tensors"] = name
    atomic_write(directory / POINTER, json.dumps(meta, indent=1))
    old = sorted(directory.glob("ckpt-*.safetensors"))
    for stale in old[:-keep] if keep > 0 else []:
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return directory / name


def latest_step(directory: str | os.PathLike) -> int | None:
    """Step of the newest complete checkpoint in ``directory``, or None."""
    pointer = Path(directory) / POINTER
    if not pointer.is_file():
        return None
    return int(json.loads(pointer.read_text())["step"])


def load_checkpoint(directory: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Restore ``model`` (and ``optimizer``) in place from the newest checkpoint.

    Returns the JSON metadata (``step``, ``extra``) or None when there is no checkpoint.
    """
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    meta = json.loads(pointer.read_text())
    file = directory / meta["tensors"]
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {file.name}, which is missing")
    tensors = load_file(str(file))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    if optimizer is not None:
        if "optim" not in meta:
            raise ValueError(f"checkpoint {file} holds no optimizer state")
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optim"]))
    return meta
