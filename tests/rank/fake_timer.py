"""A deterministic stand-in for measured latency (no clocks involved).

Time = sum over the convs a forward pass runs of ``macs / rate + overhead``, plus a fixed cost per
non-conv leaf module (the part of a model no factorization can change).  channels_last convs run
``cl_speedup`` times faster.  With ``e2e_penalty`` each factorized piece costs extra only when a
whole model is timed, so per-layer predictions are optimistic and the planner must tighten.
"""
from __future__ import annotations

import torch
from torch import nn

from convfactor.spec.convspec import is_conv
from convfactor.methods.base import Factorized


class FakeTimer:
    def __init__(self, rate: float = 1e9, overhead: float = 2e-6, other: float = 5e-6, cl_speedup: float = 1.5,
                 e2e_penalty: float = 0.0):
        self.rate, self.overhead, self.other, self.cl_speedup = rate, overhead, other, cl_speedup
        self.e2e_penalty = e2e_penalty
        self.calls = 0

    def __repr__(self) -> str:
        return (f"FakeTimer(rate={self.rate}, overhead={self.overhead}, other={self.other}, "
                f"cl_speedup={self.cl_speedup}, e2e_penalty={self.e2e_penalty})")

    def __call__(self, module: nn.Module, inputs: tuple) -> float:
        self.calls += 1
        x = inputs[0]
        cl = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        total = [0.0]
        hooks = []
        leaves = [m for m in module.modules() if not list(m.children())] or [module]
        for m in leaves:
            if is_conv(m) or isinstance(m, nn.Linear):
                def hook(mod, args, out):
                    if isinstance(mod, nn.Linear):
                        macs = out.numel() * mod.in_features
                    else:
                        macs = out.numel() * mod.weight[0].numel()
                    total[0] += macs / (self.rate * (self.cl_speedup if cl else 1.0)) + self.overhead
                hooks.append(m.register_forward_hook(hook))
            else:
                hooks.append(m.register_forward_hook(lambda *a: total.__setitem__(0, total[0] + self.other)))
        try:
            with torch.no_grad():
                module(*inputs)
        finally:
            for h in hooks:
                h.remove()
        whole_model = sum(isinstance(m, Factorized) for m in module.modules()) > 1
        if whole_model and self.e2e_penalty:
            pieces = sum(len(m) for m in module.modules() if isinstance(m, Factorized))
            total[0] += self.e2e_penalty * pieces
        return total[0]
