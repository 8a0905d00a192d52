"""Training a factorized architecture from scratch (Tai et al. 2016, "Convolutional Neural Networks
with Low-Rank Regularization", ICLR, sec. 3.2-3.3).

Instead of decomposing trained kernels, the low-rank *structure* is built from the start and trained
from a fresh initialization; Tai et al. report that a BatchNorm layer after each factor (their
vertical k x 1 and horizontal 1 x k convs) is what makes such deep low-rank nets trainable.
:func:`lowrank_structure` builds that architecture with any method of the registry (``spatial_svd``
is Tai et al.'s scheme) from the usual NNI-style rules, re-initializes every factor (Kaiming, as a
fresh ``nn.Conv`` does) and optionally inserts ``BatchNorm`` between the factors.  The result is an
ordinary ``nn.Module``: train it with :func:`convfactor.finetune` or your own loop.
"""
from __future__ import annotations

import torch
from torch import nn

from ..compression.api import compress
from ..spec.convspec import conv_of
from ..compression.surgery import set_submodule
from ..methods.base import Factorized

__all__ = ["lowrank_structure", "insert_batchnorm"]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def insert_batchnorm(factorized: nn.Sequential, *, last: bool = False) -> nn.Sequential:
    """``pieces`` -> ``piece, BN, piece, BN, ..., piece`` (a plain ``nn.Sequential``).

    BatchNorm goes after every conv piece except the last (unless ``last``), where the original
    network's own normalization, if any, already follows.
    """
    pieces = list(factorized)
    out: list[nn.Module] = []
    for i, piece in enumerate(pieces):
        out.append(piece)
        conv = conv_of(piece)
        if (i < len(pieces) - 1 or last) and isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            bn = _BN[conv.weight.dim() - 2](conv.out_channels)
            out.append(bn.to(device=conv.weight.device, dtype=conv.weight.dtype))
    return nn.Sequential(*out)


def lowrank_structure(model: nn.Module, rules, example_input, *, batchnorm: bool = True, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the layers ``rules`` select replaced by freshly initialized factorized
    structures (ranks from the rules), with BatchNorm between the factors when ``batchnorm``.

    Layers no rule selects are re-initialized too (``reset_parameters``), since the point is to
    train the whole network from scratch.  ``model`` is not modified.
    """
    work, _ = compress(model, rules, example_input)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in work.modules():
            if hasattr(module, "reset_parameters") and not isinstance(module, nn.Sequential):
                module.reset_parameters()
    finally:
        torch.set_rng_state(gen_state)
    if batchnorm:
        names = [name for name, m in work.named_modules() if isinstance(m, Factorized)]
        for name in names:
            set_submodule(work, name, insert_batchnorm(work.get_submodule(name)))
    return work.train()
