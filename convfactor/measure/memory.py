"""Peak activation memory of one forward pass.

What is counted: bytes allocated *during* the forward (activations, im2col buffers, outputs),
not the parameters or the inputs that exist before it.  The peak is the maximum of the running
sum of allocations minus frees.

* CPU: every operator's output is tracked (a ``TorchDispatchMode``) by its storage, each storage
  counted once (views and in-place results share it) until it is freed; storages that existed before
  the call (inputs, parameters) are not counted.  The live total is taken after every operator.
  This sees every tensor passed between operators (e.g. the unfolded columns of an im2col
  convolution) but not a native kernel's private scratch space, so it is a lower bound at
  operator granularity.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, includes
  workspaces), minus the memory allocated before the call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..utils import as_inputs, torch_threads

__all__ = ["peak_memory", "replay_peak"]


def replay_peak(deltas: list[int]) -> int:
    """Peak of the running sum of ``deltas`` (bytes allocated > 0, freed < 0), starting from 0."""
    current = peak = 0
    for d in deltas:
        current += d
        peak = max(peak, current)
    return peak


class _LiveTracker(TorchDispatchMode):
    """Running total of bytes held by storages created by operators inside the mode."""

    def __init__(self, pre_existing: set[int]):
        super().__init__()
        self.pre_existing = pre_existing
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.pre_existing:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@torch.no_grad()
def peak_memory(module: nn.Module | Callable, inputs, *, threads: int | None = 1) -> dict:
    """``{'peak_bytes', 'output_bytes', 'device', 'how'}`` for one call ``module(*inputs)``.

    ``peak_bytes``: the peak of memory allocated during the call (see the module docstring).
    """
    inputs = as_inputs(inputs)
    if isinstance(module, nn.Module):
        module.eval()
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    with torch_threads(threads), torch.inference_mode():
        module(*inputs)                     # warm-up: lazy initializations are not activations
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = module(*inputs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            how = "torch.cuda.max_memory_allocated"
        else:
            pre = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            if isinstance(module, nn.Module):
                pre |= {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
            with _LiveTracker(pre) as tracker:
                out = module(*inputs)
                tracker.peak = max(tracker.peak, tracker.current)
            peak = tracker.peak
            how = "live operator outputs (operator granularity)"
    outs = out if isinstance(out, (tuple, list)) else (out,)
    out_bytes = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    return {"peak_bytes": int(max(peak, 0)), "output_bytes": int(out_bytes), "device": str(device), "how": how}
