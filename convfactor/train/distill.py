"""Knowledge distillation from the original (teacher) model.

* Output distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): for
  classification, ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (their eq. 2 gradient scaling); for
  image-to-image models (SR, denoising), the regression loss between student and teacher outputs.
* Feature distillation (Romero et al. 2015, "FitNets"): mean squared error between the outputs of
  named intermediate layers.  A compressed model keeps its original layer names (a factorized
  layer is swapped in under the same name and has the same output shape), so the same names
  address both models and no adapter is needed.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureTap", "kd_loss", "feature_loss"]


class FeatureTap:
    """Records the outputs of named submodules of ``model`` on every forward.

    Use as a context manager (hooks are removed on exit); ``tap.features`` maps name -> tensor.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.model, self.names, self.detach = model, list(names), detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        for name in self.names:
            try:
                layer = self.model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"distillation layer {name!r} is not a submodule of the model") from None

            def hook(mod, args, out, name=name):
                self.features[name] = out.detach() if self.detach else out
            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "l1", temperature: float = 4.0) -> torch.Tensor:
    """Output distillation loss; ``kind`` is ``"kl"`` (logits), ``"l1"`` or ``"mse"``."""
    teacher = teacher.detach()
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1),
                        reduction="batchmean") * t * t
    if kind == "l1":
        return F.l1_loss(student, teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r} (use 'kl', 'l1' or 'mse')")


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the MSE between matching feature maps."""
    if not student:
        raise ValueError("no features were recorded for feature distillation")
    losses = []
    for name, s in student.items():
        t = teacher[name].detach()
        if s.shape != t.shape:
            raise ValueError(f"feature {name!r}: student shape {tuple(s.shape)} != teacher {tuple(t.shape)}")
        losses.append(F.mse_loss(s, t))
    return torch.stack(losses).mean()
