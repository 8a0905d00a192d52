"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds::

    DIR/ckpt-STEP.safetensors   model state ("model.*") and optimizer tensors ("optim.*")
    DIR/latest.json             {"step", "tensors": "ckpt-STEP.safetensors", "optim": {...}, "extra": {...}}

Both files are written atomically (temporary sibling + ``os.replace``); ``latest.json`` is written
last and is the commit point, so a run killed at any moment leaves the previous checkpoint valid.
Older tensor files are removed after the new pointer is in place.  Loading never unpickles.

Optimizer state dicts (``{"state": {i: {k: tensor|number|None}}, "param_groups": [...]}``) are
flattened: tensors go to ``optim.state.I.KEY``, the rest to JSON.

``extra`` holds what the caller needs to decide whether a checkpoint belongs to its run (the
fine-tuning settings; see :func:`convfactor.train.finetune.run_settings`): read it with
:func:`checkpoint_meta` before loading anything.  :func:`clear_checkpoints` removes the files this
module writes (and only those), so a fresh run never mixes its records with an older one's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write, read_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_step", "checkpoint_meta", "clear_checkpoints",
           "flatten_optimizer_state", "unflatten_optimizer_state"]

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
    _prune(directory, name, keep)
    return directory / name


def _prune(directory: Path, current: str, keep: int) -> None:
    """Keep ``current`` and the newest ``keep - 1`` earlier tensor files (all with ``keep <= 0``);
    files of later steps are left over from another run and go too."""
    if keep <= 0:
        return
    others = sorted(f for f in directory.glob("ckpt-*.safetensors") if f.name != current)
    earlier = [f for f in others if f.name < current]
    kept = set(earlier[len(earlier) - max(keep - 1, 0):]) if keep > 1 else set()
    for stale in others:
        if stale not in kept:
            stale.unlink(missing_ok=True)


def checkpoint_meta(directory: str | os.PathLike) -> dict | None:
    """The newest checkpoint's JSON metadata (``step``, ``extra``, ...) without loading tensors, or None."""
    pointer = Path(directory) / POINTER
    if not pointer.is_file():
        return None
    try:
        meta = json.loads(pointer.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint pointer {pointer} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(meta, dict) or "step" not in meta or "tensors" not in meta:
        raise ValueError(f"checkpoint pointer {pointer} is not a convfactor checkpoint")
    return meta


def clear_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Remove the checkpoint files of :func:`save_checkpoint` (pointer first) from ``directory``;
    any other file there is kept.  Returns the paths removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [directory / POINTER] if (directory / POINTER).is_file() else []
    removed += sorted(directory.glob("ckpt-*.safetensors")) + sorted(directory.glob(".ckpt-*.safetensors.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def latest_step(directory: str | os.PathLike) -> int | None:
    """Step of the newest complete checkpoint in ``directory``, or None."""
    meta = checkpoint_meta(directory)
    return None if meta is None else int(meta["step"])


def load_checkpoint(directory: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Restore ``model`` (and ``optimizer``) in place from the newest checkpoint.

    Returns the JSON metadata (``step``, ``extra``) or None when there is no checkpoint.
    """
    directory = Path(directory)
    pointer = directory / POINTER
    meta = checkpoint_meta(directory)
    if meta is None:
        return None
    file = directory / meta["tensors"]
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {file.name}, which is missing")
    tensors = read_safetensors(file)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    if optimizer is not None:
        if "optim" not in meta:
            raise ValueError(f"checkpoint {file} holds no optimizer state")
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optim"]))
    return meta
