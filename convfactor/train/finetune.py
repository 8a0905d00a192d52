"""Fine-tuning a (compressed) model: Adam/SGD, cosine/step schedules, distillation, checkpoints, resume, DDP.

:func:`finetune` trains ``model`` in place, with the settings of a :class:`FinetuneConfig`, and hands
it back as the same ordinary ``nn.Module`` (never a wrapper), in eval mode.  It is deterministic
given ``seed``: the batch of step ``k`` is drawn from a generator seeded by ``(seed, k, rank)`` and
the global torch RNG is re-seeded from ``(seed, k)`` before each step (dropout etc.), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.  With a checkpoint
directory, a checkpoint is written atomically every ``checkpoint.every`` steps and at the end; with
``checkpoint.resume`` (the default) a run finding one there continues from it, losing at most one
checkpoint interval.  A checkpoint records the run's settings (:func:`run_settings`): one written
with other settings is never resumed (that would train a mix of two runs and record only one);
it is an error, or with ``checkpoint.restart_on_mismatch`` it is removed and training starts fresh;
:func:`resume_step` says which (and refuses a mismatch) from the checkpoint's JSON alone, so a caller
can ask before an expensive set-up.

Ctrl-C (SIGINT) during training, in the main thread and without DDP, is held until the step in progress
ends; a checkpoint of that step is then written (atomically, when there is a checkpoint directory) and
:class:`Interrupted` (a ``KeyboardInterrupt``) is raised, so re-running the same call resumes exactly
where it stopped.  A second Ctrl-C stops at once (no checkpoint of the step in progress; the last one
stays valid).  A ``KeyboardInterrupt`` raised by ``callback`` is treated like the first Ctrl-C.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..files import check_writable
from ..methods.base import model_regularizer, regularized_layers
from . import checkpoint as ckpt
from .distill import FeatureTap, feature_loss, kd_loss

__all__ = ["finetune", "FinetuneConfig", "OptimizerConfig", "DistillConfig", "CheckpointConfig", "lr_factor",
           "make_optimizer", "batch_for_step", "run_settings", "resume_step", "Interrupted"]

_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "ce": F.cross_entropy}
_OPTIMIZERS = ("adam", "adamw", "sgd")
_DISTILL_LOSSES = ("kl", "l1", "mse")


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


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its learning-rate schedule (see :func:`lr_factor`)."""
    name: str = "adam"                    # "adam", "adamw" or "sgd" (Nesterov when momentum > 0)
    lr: float = 1e-4                      # base learning rate
    weight_decay: float = 0.0
    momentum: float = 0.9                 # SGD only
    schedule: str = "cosine"              # "cosine", "step" or "constant"
    warmup: int = 0                       # linear warm-up steps
    step_size: int | None = None          # "step": steps between decays (None: a third of the run)
    gamma: float = 0.1                    # "step": decay factor
    min_lr_ratio: float = 0.0             # "cosine": final lr / base lr
    grad_clip: float | None = None        # max global gradient norm (None: no clipping)

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r} (use 'adam', 'adamw' or 'sgd')")
        lr_factor(0, 1, self.schedule)    # validates the schedule name

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of ``step`` (0-based) of ``steps``."""
        return self.lr * lr_factor(step, steps, self.schedule, warmup=self.warmup, step_size=self.step_size,
                                   gamma=self.gamma, min_ratio=self.min_lr_ratio)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a teacher (Hinton et al. 2015 outputs, Romero et al. 2015 features);
    used only when :func:`finetune` is given a ``teacher``."""
    weight: float = 1.0                   # output distillation loss weight (0 disables it)
    loss: str | None = None               # "kl", "l1" or "mse"; None: "kl" for loss="ce", else the task loss kind
    temperature: float = 4.0              # "kl" only
    feature_layers: tuple[str, ...] = ()  # layer names present in both models (feature MSE)
    feature_weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        if self.loss is not None and self.loss not in _DISTILL_LOSSES:
            raise ValueError(f"unknown distillation loss {self.loss!r} (use 'kl', 'l1' or 'mse')")


@dataclass(frozen=True)
class CheckpointConfig:
    """Atomic checkpoints (:mod:`convfactor.train.checkpoint`) and resume."""
    directory: str | Path | None = None   # None: no checkpoints
    every: int = 100                      # steps between checkpoints (one is also written at the end)
    resume: bool = True                   # continue from a checkpoint found in ``directory`` (False: remove it)
    restart_on_mismatch: bool = False     # a checkpoint with other settings: start fresh (False: refuse)
    run_info: dict = field(default_factory=dict)   # what else identifies the run (data, model): compared too

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of :func:`finetune`; validated when built, so a bad one fails before any work."""
    steps: int                            # optimizer steps
    batch_size: int = 16
    loss: str | Callable = "l1"           # "l1", "mse", "ce" or a callable (output, target) -> scalar
    task_weight: float = 1.0              # weight of the loss to the ground truth (0 disables it)
    basis_weight: float | None = None     # gamma of Li et al.'s eq. 12 regularizer on basis layers (None: 1; 0: off)
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    device: str | torch.device | None = None   # move the model here first (None: where it is)
    ddp: bool | None = None               # wrap in DDP (None: when a process group is initialized)
    progress: bool = True
    desc: str = "fine-tuning"             # the progress bar's label

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.loss, str) and self.loss not in _LOSSES:
            raise ValueError(f"unknown loss {self.loss!r} (use 'l1', 'mse', 'ce' or a callable)")

    @property
    def loss_fn(self) -> Callable:
        return _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    @property
    def distill_kind(self) -> str:
        """The output distillation loss: as given, else KL for classifiers, else the task loss kind."""
        if self.distill.loss:
            return self.distill.loss
        return "kl" if self.loss == "ce" else self.loss if isinstance(self.loss, str) else "mse"


# ---------------------------------------------------------------------------------------------- pieces
def make_optimizer(params: Iterable[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over the trainable ``params`` (at the base learning rate)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.momentum > 0)


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
    """A batch -> (input, target or None)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch["input"], batch.get("target")
    return batch, None


def _distributed() -> tuple[bool, int]:
    """(a process group is initialized, this process's rank)."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


@dataclass
class _Run:
    """What one fine-tuning run holds while it trains."""
    config: FinetuneConfig
    model: nn.Module                      # the module trained and returned
    net: nn.Module                        # ``model``, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None
    regularizer: Callable | None          # the layers' training regularizers, when any applies
    device: torch.device
    rank: int
    ddp: bool


def _check(config: FinetuneConfig, teacher: nn.Module | None) -> None:
    """Fail before any work: feature distillation without a teacher, an unwritable checkpoint dir."""
    if config.distill.feature_layers and teacher is None:
        raise ValueError("feature_layers needs a teacher model")
    if config.checkpoint.directory is not None:
        cdir = Path(config.checkpoint.directory)
        check_writable(cdir / "latest.json" if cdir.is_dir() else cdir)


def _start(model: nn.Module, config: FinetuneConfig, teacher: nn.Module | None) -> _Run:
    """Device, frozen teacher, regularizer, then (in this order) DDP wrap and optimizer."""
    is_dist, rank = _distributed()
    use_ddp = is_dist if config.ddp is None else config.ddp
    if use_ddp and not is_dist:
        raise ValueError("ddp=True needs an initialized torch.distributed process group (see convfactor.train.ddp)")
    if config.device is not None:
        model.to(config.device)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    regularized = config.basis_weight != 0 and bool(regularized_layers(model))
    # Factorize first (done by the caller), then wrap, then build the optimizer.
    net = model
    if use_ddp:
        net = DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])
    return _Run(config, model, net, make_optimizer(net.parameters(), config.optimizer), teacher,
                model_regularizer if regularized else None, device, rank, use_ddp)


def run_settings(config: FinetuneConfig) -> dict[str, Any]:
    """The settings that shape a run's trajectory, as plain JSON data: a checkpoint records them and
    is resumed only by a run with the same.  Optimizer fields by their own names (``lr``,
    ``optimizer``, ``schedule``, ...), distillation ones as ``distill.NAME``, then
    ``checkpoint.run_info``."""
    optimizer = asdict(config.optimizer)
    loss = config.loss if isinstance(config.loss, str) else getattr(config.loss, "__qualname__", repr(config.loss))
    settings = {"steps": config.steps, "batch_size": config.batch_size, "loss": loss,
                "task_weight": config.task_weight, "basis_weight": config.basis_weight, "seed": config.seed,
                "optimizer": optimizer.pop("name"), **optimizer,
                **{f"distill.{k}": v for k, v in asdict(config.distill).items()}, **config.checkpoint.run_info}
    return json.loads(json.dumps(settings, default=str))          # tuples as lists, as read back


def _settings_mismatch(recorded: dict, current: dict) -> str | None:
    """``'lr=0.001 (now 0.01)'`` for the first setting that differs, or None.  Older checkpoints
    recorded only ``seed`` and ``steps``; a setting a checkpoint does not record is not compared."""
    for key, value in current.items():
        if key in recorded and recorded[key] != value:
            return f"{key}={recorded[key]!r} (now {value!r})"
    return None


def resume_step(config: FinetuneConfig) -> int | None:
    """The step a run with ``config`` resumes from, or None when it starts fresh (no checkpoint
    directory or none there, ``checkpoint.resume=False``, or other settings with
    ``checkpoint.restart_on_mismatch``).  A checkpoint written with other settings is otherwise a
    ValueError.  Reads only the checkpoint's JSON pointer (no tensors) and writes nothing: call it
    before an expensive set-up; :func:`finetune` calls it too."""
    cp = config.checkpoint
    meta = None if cp.directory is None or not cp.resume else ckpt.checkpoint_meta(cp.directory)
    if meta is None:
        return None
    extra = meta.get("extra", {})
    mismatch = _settings_mismatch({**extra.get("settings", {}), **{k: extra[k] for k in ("seed", "steps")
                                                                   if k in extra}}, run_settings(config))
    if mismatch is not None:
        if cp.restart_on_mismatch:
            return None
        raise ValueError(f"checkpoint in {cp.directory} was written with {mismatch}; resume with the same "
                         f"settings, start fresh (--overwrite; restart_on_mismatch=True) or use another "
                         f"checkpoint directory")
    if int(meta["step"]) > config.steps:
        raise ValueError(f"checkpoint in {cp.directory} is at step {meta['step']}, beyond steps={config.steps}")
    return int(meta["step"])


def _resume(run: _Run) -> int:
    """The first step to run: 0, or the step of the checkpoint found (see :func:`resume_step`), loaded."""
    directory = run.config.checkpoint.directory
    if directory is None:
        return 0
    if resume_step(run.config) is not None:
        return int(ckpt.load_checkpoint(directory, run.model, run.optimizer)["step"])
    if ckpt.checkpoint_meta(directory) is not None:
        ckpt.clear_checkpoints(directory)                  # a fresh start never mixes with the old records
    return 0


def _loss(run: _Run, x: torch.Tensor, target) -> torch.Tensor:
    """Task loss + output and feature distillation + the layers' regularizers, each with its weight."""
    cfg, d = run.config, run.config.distill
    with FeatureTap(run.model, d.feature_layers) as s_tap:
        out = run.net(x)
    total = out.new_zeros(())
    if target is not None and cfg.task_weight:
        total = total + cfg.task_weight * cfg.loss_fn(out, target)
    if run.teacher is not None:
        with torch.no_grad(), FeatureTap(run.teacher, d.feature_layers, detach=True) as t_tap:
            t_out = run.teacher(x)
        if d.weight:
            total = total + d.weight * kd_loss(out, t_out, kind=cfg.distill_kind, temperature=d.temperature)
        if d.feature_layers and d.feature_weight:
            total = total + d.feature_weight * feature_loss(s_tap.features, t_tap.features)
    if run.regularizer is not None:
        gamma = 1.0 if cfg.basis_weight is None else cfg.basis_weight
        term = run.regularizer(run.model, original=run.teacher, gamma=gamma)
        total = total if term is None else total + term
    if not total.requires_grad:
        raise ValueError("nothing to optimize: no target in the data and no teacher for distillation")
    return total


def _step(run: _Run, data, step: int) -> tuple[float, float]:
    """One optimizer step (0-based ``step``); returns (loss, learning rate)."""
    cfg = run.config
    torch.manual_seed((cfg.seed * 1_000_003 + step) % (2 ** 63))
    x, target = _split(batch_for_step(data, step, cfg.batch_size, cfg.seed, run.rank))
    x = x.to(run.device)
    target = target.to(run.device) if isinstance(target, torch.Tensor) else target
    lr = cfg.optimizer.lr_at(step, cfg.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = _loss(run, x, target)
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.optimizer.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optimizer.grad_clip)
    run.optimizer.step()
    value = float(total.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss became {value} at step {step + 1}; lower the learning rate")
    return value, lr


def _save(run: _Run, done: int) -> None:
    """The checkpoint of ``done`` steps (atomic; see :mod:`convfactor.train.checkpoint`)."""
    cfg = run.config
    ckpt.save_checkpoint(cfg.checkpoint.directory, done, run.model, run.optimizer,
                         extra={"seed": cfg.seed, "steps": cfg.steps, "settings": run_settings(cfg)})


def _maybe_checkpoint(run: _Run, done: int) -> None:
    """Rank 0 writes a checkpoint every ``checkpoint.every`` steps and at the end; DDP ranks wait for it."""
    cfg = run.config
    if cfg.checkpoint.directory is None or (done % cfg.checkpoint.every and done != cfg.steps):
        return
    if run.rank == 0:
        _save(run, done)
    if run.ddp:
        dist.barrier()


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (or a ``KeyboardInterrupt``) after ``step`` of ``steps`` steps.

    ``checkpoint_step``: the step of the newest checkpoint in ``directory`` (``step`` itself when the
    interrupt came between steps and the checkpoint was written then), or None when there is none;
    ``saved``: whether the model's state at ``step`` is in that checkpoint (else the interrupt came
    inside a step, and a re-run resumes from ``checkpoint_step``)."""

    def __init__(self, step: int, steps: int, directory: str | Path | None, checkpoint_step: int | None,
                 saved: bool):
        super().__init__(f"interrupted at step {step} of {steps}")
        self.step, self.steps, self.directory = step, steps, directory
        self.checkpoint_step, self.saved = checkpoint_step, saved


def _interrupted(run: _Run, done: int, between_steps: bool) -> Interrupted:
    """The :class:`Interrupted` of a stop after ``done`` steps; between steps (the model and optimizer
    whole) rank 0 of a run without DDP first writes the checkpoint of ``done`` (unless it exists)."""
    directory = run.config.checkpoint.directory
    last = None if directory is None else ckpt.latest_step(directory)
    if between_steps and directory is not None and not run.ddp and run.rank == 0 and last != done:
        _save(run, done)
        last = done
    return Interrupted(done, run.config.steps, directory, last, between_steps and last == done)


class _HeldInterrupt:
    """While training (main thread, the default SIGINT handler in place): the first Ctrl-C is held
    until :meth:`check` at the end of the step in progress; a second one raises at once."""

    def __init__(self, active: bool):
        self.active = (active and threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self.requested = False

    def __enter__(self) -> "_HeldInterrupt":
        if self.active:
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _progress_bar(run: _Run, start: int):
    if not (run.config.progress and run.rank == 0):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=run.config.steps, initial=start, desc=run.config.desc, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- the loop
def finetune(model: nn.Module, data, config: FinetuneConfig, *, teacher: nn.Module | None = None,
             history: list | None = None, callback: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``model`` for ``config.steps`` optimizer steps and return it (same object, eval mode).

    ``data``: a map-style data set of ``(input, target)`` items (or inputs alone, for pure
    distillation), or a callable ``(step, generator) -> batch``; see :func:`batch_for_step`.
    ``teacher``: the original model, for the distillation of ``config.distill`` and as the
    reference kernels of the layers' training regularizers (:func:`convfactor.methods.base.model_regularizer`:
    the basis layers' eq. 12, :func:`convfactor.methods.basis.basis_regularizer`, weighted by
    ``config.basis_weight``; applied whenever the model holds such layers and ``basis_weight != 0``).
    Under DDP (a process group initialized, or ``config.ddp``) the model is wrapped after any
    factorization (the model you pass) and before the optimizer is built; each rank draws its own
    batches; rank 0 writes checkpoints.
    ``history``: a list receiving ``{"step", "loss", "lr", "time_s"}`` per step.
    ``callback(step, loss)``: called after each step (1-based count of steps done).
    Ctrl-C (or a ``KeyboardInterrupt`` from ``callback``) raises :class:`Interrupted` after writing the
    checkpoint of the last whole step (see the module docstring).
    """
    _check(config, teacher)
    # the teacher is frozen and put in eval mode while it teaches, and handed back as it came
    thawed = [p for p in teacher.parameters() if p.requires_grad] if teacher is not None else []
    teacher_training = teacher.training if teacher is not None else False
    try:
        return _train(model, data, config, teacher, history, callback)
    finally:
        for p in thawed:
            p.requires_grad_(True)
        if teacher is not None:
            teacher.train(teacher_training)


def _train(model: nn.Module, data, config: FinetuneConfig, teacher, history, callback) -> nn.Module:
    """:func:`finetune`'s loop (the teacher's flags are the caller's to restore)."""
    run = _start(model, config, teacher)
    start = _resume(run)
    bar = _progress_bar(run, start)
    t0 = time.perf_counter()
    model.train()
    done = start
    try:
        with _HeldInterrupt(not run.ddp) as held:
            for step in range(start, config.steps):
                value, lr = _step(run, data, step)
                done = step + 1
                if history is not None:
                    history.append({"step": done, "loss": value, "lr": lr, "time_s": time.perf_counter() - t0})
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4g}", lr=f"{lr:.2g}", refresh=False)
                    bar.update(1)
                try:
                    _maybe_checkpoint(run, done)
                    if callback is not None:
                        callback(done, value)
                    held.check()
                except KeyboardInterrupt:
                    raise _interrupted(run, done, between_steps=True) from None
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise _interrupted(run, done, between_steps=False) from None
    finally:
        if bar is not None:
            bar.close()
    return model.eval()
