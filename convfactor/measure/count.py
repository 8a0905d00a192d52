"""Params, MACs and FLOPs.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (it counts convolutions and matmuls,
2 FLOPs per multiply-accumulate), so ``macs = flops / 2``.  MACs are a count of arithmetic, not
a speed: latency lives in :mod:`convfactor.measure.latency`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..compression.calibration import clone_tree
from ..utils import as_inputs, eval_mode

__all__ = ["count", "count_params"]


def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor counted once."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count(model: nn.Module, example_input) -> dict[str, Any]:
    """``{'params', 'macs', 'flops', 'input_shape', 'layers': {name: {'params', 'macs', 'flops'}}}``.

    ``layers`` lists every leaf module that holds parameters or does counted arithmetic.
    Totals are for one forward pass on ``example_input`` (a tensor or a tuple of tensors; the model
    runs on a copy, so a model that changes its input in place leaves the caller's as it was).
    """
    inputs = as_inputs(example_input)
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(*clone_tree(inputs))
    raw = counter.get_flop_counts()
    prefix = type(model).__name__
    flops_by_name = {}
    for key, ops in raw.items():
        if key == "Global":
            continue
        name = key[len(prefix) + 1:] if key.startswith(prefix + ".") else ("" if key == prefix else key)
        flops_by_name[name] = int(sum(ops.values()))
    total_flops = int(sum(raw.get("Global", {}).values()))
    layers = {}
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        flops = flops_by_name.get(name, 0)
        if params or flops:
            layers[name] = {"type": type(module).__name__, "params": params, "flops": flops, "macs": flops // 2}
    return {"params": count_params(model), "flops": total_flops, "macs": total_flops // 2,
            "input_shape": [list(t.shape) for t in inputs] if len(inputs) > 1 else list(inputs[0].shape),
            "layers": layers}
