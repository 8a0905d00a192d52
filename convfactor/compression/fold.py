"""Folding factorized layers back into dense ones: the step between two stages of multi-stage
compression (MUSCO, Gusak et al., "Automated Multi-Stage Compression of Neural Networks", ICCV
Workshops 2019, Sec. 3: compress, fine-tune, compress again).

A :class:`~convfactor.methods.base.Factorized` layer is a chain of linear pieces, so it computes one
dense kernel: ``method.reconstruct(method.factors_of(layer))``, with the last piece's bias.  After a
stage has been fine-tuned, that kernel is what the network has learned; folding it back gives the
next stage a plain layer to plan and factorize again (at a lower rank, or with another method),
instead of factorizing factors into ever longer chains.

Every fold is checked on a random probe against the factorized layer; a layer whose fold does not
match (a piece with a bias of its own before a padded piece, a module the method does not describe)
stays factorized, with the reason.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..methods import registry
from ..methods.base import Factorized, default_input_size
from ..spec.convspec import conv_of, make_conv

__all__ = ["dense_of", "fold_factorized"]


def dense_of(layer: Factorized) -> nn.Module:
    """The dense Conv/Linear computing what ``layer`` computes (same dtype and device).

    Raises ValueError when the fold does not reproduce ``layer`` on a random probe."""
    method = registry.get(layer.method, **layer.options)
    spec = layer.spec
    ref = next(layer.parameters())
    kernel = method.reconstruct(method.factors_of(layer), spec)
    dense = make_conv(spec, spec.in_channels, spec.out_channels, axes=range(spec.dim), groups=spec.groups,
                      bias=spec.bias, dtype=ref.dtype, device=ref.device)
    biases = [m.bias for m in layer.modules() if isinstance(getattr(m, "bias", None), torch.Tensor)]
    with torch.no_grad():
        conv_of(dense).weight.copy_(kernel.reshape(conv_of(dense).weight.shape))
        if spec.bias:       # the piece that adds the output (the probe below catches any other layout)
            conv_of(dense).bias.copy_(biases[-1] if biases else torch.zeros_like(conv_of(dense).bias))
    _check_fold(layer, dense)
    return dense


def _check_fold(layer: Factorized, dense: nn.Module) -> None:
    spec = layer.spec
    size = () if spec.is_linear else default_input_size(spec)
    ref = next(layer.parameters())
    probe = torch.randn(2, spec.in_channels, *size, generator=torch.Generator().manual_seed(0)).to(ref)
    with torch.no_grad():
        want, got = layer(probe), dense(probe)
    scale = float(want.abs().max()) or 1.0
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    if want.shape != got.shape or float((want - got).abs().max()) > tol * scale:
        raise ValueError(f"{layer.method}: the folded kernel does not reproduce the factorized layer")


def fold_factorized(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with every factorized layer folded into its dense equivalent, and
    ``{name: reason}`` for those left factorized.  ``model`` is not modified."""
    out = copy.deepcopy(model)
    skipped = {}
    for name, module in list(out.named_modules()):
        if not isinstance(module, Factorized):
            continue
        try:
            dense = dense_of(module)
        except (ValueError, NotImplementedError, KeyError) as exc:
            skipped[name] = str(exc)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, dense)
    return out, skipped
