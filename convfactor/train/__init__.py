"""Layer 6, training: :func:`finetune` with a :class:`FinetuneConfig` (Adam/SGD, schedules,
distillation, basis regularizer, checkpoints + resume, DDP; Ctrl-C ends it as :class:`Interrupted`
after a checkpoint), :func:`resume_step` (a checkpoint's fit, asked before the set-up),
:func:`training_set` (training data by task), :func:`lowrank_structure` (Tai et al. from-scratch
training), the distillation helpers, pickle-free checkpoints and the DDP helpers.  Names load lazily
(no import cost).  Quality is measured by :mod:`convfactor.measure.quality`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "finetune": "finetune", "FinetuneConfig": "finetune", "OptimizerConfig": "finetune",
    "DistillConfig": "finetune", "CheckpointConfig": "finetune", "lr_factor": "finetune",
    "batch_for_step": "finetune", "resume_step": "finetune", "Interrupted": "finetune",
    "FeatureTap": "distill", "kd_loss": "distill", "feature_loss": "distill",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "latest_step": "checkpoint",
    "lowrank_structure": "scratch", "insert_batchnorm": "scratch",
    "training_set": "datasets",
}
__all__ = sorted(_EXPORTS) + ["ddp"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name == "ddp":
        return importlib.import_module(f"{__name__}.ddp")
    raise AttributeError(f"module 'convfactor.train' has no attribute {name!r}")
