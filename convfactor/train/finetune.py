"""Fine-tuning a (compressed) model: Adam/SGD, cosine/step schedules, distillation, checkpoints, resume, DDP.

:func:`finetune` trains ``model`` in place and hands it back as the same ordinary ``nn.Module``
(never a wrapper), in eval mode.  It is deterministic given ``seed``: the batch of step ``k`` is
drawn from a generator seeded by ``(seed, k, rank)`` and the global torch RNG is re-seeded from
``(seed, k)`` before each step (dropout etc.), so a run resumed from a checkpoint continues exactly
as the uninterrupted run would have.  With ``checkpoint_dir`` set, a checkpoint is written
atomically every ``checkpoint_every`` steps and at the end; with ``resume=True`` (the default) a
run finding one there continues from it, losing at most one checkpoint interval.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .distill import FeatureTap, feature_loss, kd_loss

__all__ = ["finetune", "lr_factor", "make_optimizer", "batch_for_step"]

_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "ce": F.cross_entropy}


def lr_factor(step: int, steps: int, schedule: str = "cosine", *, warmup: int = 0, step_size: int | None = None,
              gamma: float = 0.1, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``steps``.

    ``cosine``: SGDR's annealing (Loshchilov & Hutter 2017, eq. 5) from 1 to ``min_ratio``;
    ``step``: ``gamma ** (step // step_size)``; ``constant``: 1.  A linear warm-up over ``warmup``
    steps multiplies any of them.
    """
    if schedule == "cosine":
        f = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
    elif schedule == "step":
        f = gamma ** (step // (step_size or max(1, steps // 3)))
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r} (use 'cosine', 'step' or 'constant')")
    if warmup and step < warmup:
        f *= (step + 1) / warmup
    return f


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, *, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r} (use 'adam', 'adamw' or 'sgd')")


def batch_for_step(data, step: int, batch_size: int, seed: int, rank: int = 0):
    """The batch of ``step``: ``batch_size`` indices drawn (with replacement) from a generator
    seeded by ``(seed, step, rank)`` and collated.  ``data`` is a map-style dataset whose items are
    tensors or tuples of tensors; a callable ``data(step, generator)`` returns the batch itself."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % (2 ** 63))
    if callable(data) and not hasattr(data, "__getitem__"):
        return data(step, g)
    n = len(data)
    if n == 0:
        raise ValueError("the training data set is empty")
    idx = torch.randint(n, (batch_size,), generator=g).tolist()
    return torch.utils.data.default_collate([data[i] for i in idx])


def _split(batch) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch["input"], batch.get("target")
    return batch, None


def _distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def finetune(model: nn.Module, data, *, steps: int, batch_size: int = 16, lr: float = 1e-4,
             optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9,
             schedule: str = "cosine", warmup: int = 0, step_size: int | None = None, gamma: float = 0.1,
             min_lr_ratio: float = 0.0, loss: str | Callable = "l1", task_weight: float = 1.0,
             teacher: nn.Module | None = None, distill_weight: float = 1.0, distill_loss: str | None = None,
             temperature: float = 4.0, feature_layers: Sequence[str] = (), feature_weight: float = 1.0,
             basis_weight: float | None = None, grad_clip: float | None = None,
             checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
             seed: int = 0, device: str | torch.device | None = None, ddp: bool | None = None,
             progress: bool = True, desc: str = "fine-tuning", history: list | None = None,
             callback: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``model`` for ``steps`` optimizer steps and return it (same object, eval mode).

    ``data``: a map-style data set of ``(input, target)`` items (or inputs alone, for pure
    distillation), or a callable ``(step, generator) -> batch``; see :func:`batch_for_step`.
    ``loss``: ``"l1"`` / ``"mse"`` / ``"ce"`` or a callable ``(output, target) -> scalar``,
    weighted by ``task_weight`` (0 disables it).
    ``teacher``: the original model for distillation; output loss (``distill_loss``: ``"kl"`` for
    ``loss="ce"``, else the task loss kind) times ``distill_weight``, plus the feature MSE of
    ``feature_layers`` (layer names present in both models) times ``feature_weight``.
    ``basis_weight``: ``gamma`` of :func:`convfactor.methods.basis.basis_regularizer` (Li et al.'s
    eq. 12, ``||W - B A||^2`` to the original kernels, taken from ``teacher`` when given) added
    whenever the model holds basis layers (None: 1.0; 0 disables it).
    ``ddp``: wrap in ``DistributedDataParallel`` (default: when a process group is initialized);
    the wrap happens after any factorization (the model you pass) and before the optimizer is
    built; each rank draws its own batches; rank 0 writes checkpoints.
    ``history``: a list receiving ``{"step", "loss", "lr", "time_s"}`` per step.
    ``callback(step, loss)``: called after each step (1-based count of steps done).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    lr_factor(0, max(steps, 1), schedule)              # validates the schedule name
    if isinstance(loss, str) and loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r} (use 'l1', 'mse', 'ce' or a callable)")
    loss_fn = _LOSSES[loss] if isinstance(loss, str) else loss
    kd_kind = distill_loss or ("kl" if loss == "ce" else loss if isinstance(loss, str) else "mse")
    if feature_layers and teacher is None:
        raise ValueError("feature_layers needs a teacher model")
    if checkpoint_dir is not None:
        from ..io import check_writable
        cdir = Path(checkpoint_dir)
        check_writable(cdir / "latest.json" if cdir.is_dir() else cdir)   # fail before any work

    is_dist, rank, world = _distributed()
    use_ddp = is_dist if ddp is None else ddp
    if use_ddp and not is_dist:
        raise ValueError("ddp=True needs an initialized torch.distributed process group (see convfactor.train.ddp)")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    if teacher is not None:
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    regularizer = None
    if basis_weight != 0:
        try:
            from ..methods.basis import BasisConv2d, basis_regularizer    # written with the basis method
        except ImportError:
            pass
        else:
            if any(isinstance(m, BasisConv2d) for m in model.modules()):
                regularizer = basis_regularizer
    w_basis = 1.0 if basis_weight is None else basis_weight

    # Factorize first (done by the caller), then wrap, then build the optimizer.
    net = model
    if use_ddp:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=None if dev.type == "cpu" else [dev])
    opt = make_optimizer(net.parameters(), optimizer, lr, weight_decay=weight_decay, momentum=momentum)

    start = 0
    if checkpoint_dir is not None and resume:
        meta = ckpt.load_checkpoint(checkpoint_dir, model, opt)
        if meta is not None:
            start = int(meta["step"])
            for key, value in (("seed", seed), ("steps", steps)):
                if meta["extra"].get(key, value) != value:
                    raise ValueError(f"checkpoint in {checkpoint_dir} was made with {key}={meta['extra'][key]}, not "
                                     f"{value}; resume with the same settings or use another checkpoint_dir")
    if start > steps:
        raise ValueError(f"checkpoint in {checkpoint_dir} is at step {start}, beyond steps={steps}")

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(start, steps):
            torch.manual_seed((seed * 1_000_003 + step) % (2 ** 63))
            x, target = _split(batch_for_step(data, step, batch_size, seed, rank))
            x = x.to(dev)
            target = target.to(dev) if isinstance(target, torch.Tensor) else target
            f = lr_factor(step, steps, schedule, warmup=warmup, step_size=step_size, gamma=gamma,
                          min_ratio=min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr * f
            with FeatureTap(model, feature_layers) as s_tap:
                out = net(x)
            total = out.new_zeros(())
            if target is not None and task_weight:
                total = total + task_weight * loss_fn(out, target)
            if teacher is not None:
                with torch.no_grad(), FeatureTap(teacher, feature_layers, detach=True) as t_tap:
                    t_out = teacher(x)
                if distill_weight:
                    total = total + distill_weight * kd_loss(out, t_out, kind=kd_kind, temperature=temperature)
                if feature_layers and feature_weight:
                    total = total + feature_weight * feature_loss(s_tap.features, t_tap.features)
            if regularizer is not None and w_basis:
                total = total + regularizer(model, original=teacher, gamma=w_basis)
            if not total.requires_grad:
                raise ValueError("nothing to optimize: no target in the data and no teacher for distillation")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            value = float(total.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step + 1}; lower the learning rate")
            done = step + 1
            if history is not None:
                history.append({"step": done, "loss": value, "lr": lr * f, "time_s": time.perf_counter() - t0})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4g}", lr=f"{lr * f:.2g}", refresh=False)
                bar.update(1)
            if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
                if rank == 0:
                    ckpt.save_checkpoint(checkpoint_dir, done, model, opt, extra={"seed": seed, "steps": steps})
                if use_ddp:
                    import torch.distributed as dist
                    dist.barrier()
            if callback is not None:
                callback(done, value)
    finally:
        if bar is not None:
            bar.close()
    return model.eval()
