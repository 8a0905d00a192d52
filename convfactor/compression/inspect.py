"""Per-layer facts of a model: shapes, params, MACs, condition number, energy ranks.

The condition number is that of the (N x C/g*kh*kw) kernel matrix (the largest over groups),
``kappa = s_max / s_min``; the energy ranks are those of the same matrix's spectrum.  MACs are per
sample; a Linear counts once per token (its input's numel / in_features), as :func:`convfactor.count`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.base import energy_rank
from ..methods.linalg import grouped_matrix, singular_values
from ..spec.convspec import ConvSpec
from ..utils import as_inputs, format_si
from .api import capture_layer_io, check_finite, tokens_per_sample
from .surgery import candidate_layers

__all__ = ["inspect_model", "layer_facts", "condition_number", "format_facts"]


def condition_number(singular_values: torch.Tensor) -> float:
    """``s_max / s_min`` (inf when the matrix is singular); leading axes take the max."""
    s = singular_values.double().reshape(-1, singular_values.shape[-1])
    smin = s[:, -1]
    kappa = torch.where(smin > 0, s[:, 0] / smin.clamp_min(1e-300), torch.full_like(smin, float("inf")))
    return float(kappa.max())


def layer_facts(name: str, layer: nn.Module, input_size=(), tokens: int = 1) -> dict[str, Any]:
    """Shape, params, MACs at ``input_size`` (times ``tokens``: a Linear's applications per sample),
    condition number and energy ranks of one layer.  NaN / Inf weights are a ValueError."""
    spec = ConvSpec.from_module(layer)
    check_finite(layer.weight, f"{name}.weight")
    s = singular_values(grouped_matrix(layer.weight.detach().double(), spec.groups))
    return {"name": name, "type": type(layer).__name__, "shape": list(layer.weight.shape),
            "groups": spec.groups, "stride": list(spec.stride), "params": spec.dense_params(),
            "macs": spec.dense_macs(input_size) * tokens, "kappa": condition_number(s), "full_rank": int(s.shape[-1]),
            "rank90": energy_rank(s, 0.90), "rank99": energy_rank(s, 0.99),
            "singular_values": s.max(0).values.tolist() if s.shape[0] > 1 else s[0].tolist()}


def inspect_model(model: nn.Module, example_input=None) -> list[dict[str, Any]]:
    """Facts for every Conv/Linear layer that can be factorized; MACs per sample at
    ``example_input``'s sizes (per output position / token if None)."""
    layers = candidate_layers(model)
    io = capture_layer_io(model, layers, example_input) if example_input is not None else {}
    batch = next(iter(as_inputs(example_input))).shape[0] \
        if example_input is not None else 1
    facts = []
    for name, layer in layers.items():
        size = tuple(io[name][0].shape[2:]) if name in io and not isinstance(layer, nn.Linear) else ()
        tokens = tokens_per_sample(ConvSpec.from_module(layer), io.get(name), batch)
        facts.append(layer_facts(name, layer, size, tokens))
    return facts


def format_facts(facts: list[dict[str, Any]]) -> str:
    head = f"{'layer':<32} {'weight shape':<18} {'params':>9} {'MACs':>9} {'kappa':>10} {'r90':>5} {'r99':>5} {'full':>5}"
    lines = [head, "-" * len(head)]
    for f in facts:
        shape = "x".join(map(str, f["shape"]))
        kappa = f"{f['kappa']:.3g}"
        lines.append(f"{f['name'][:32]:<32} {shape:<18} {format_si(f['params']):>9} {format_si(f['macs']):>9} "
                     f"{kappa:>10} {f['rank90']:>5} {f['rank99']:>5} {f['full_rank']:>5}")
    lines.append("-" * len(head))
    params, macs = sum(f["params"] for f in facts), sum(f["macs"] for f in facts)
    lines.append(f"{'total':<51} {format_si(params):>9} {format_si(macs):>9}"
                 "   (MACs = multiply-accumulates, not time)")
    return "\n".join(lines)
