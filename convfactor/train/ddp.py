"""Data-parallel fine-tuning with ``torch.distributed`` (torchrun or ``torch.multiprocessing``).

The order matters: **factorize first, then wrap, then build the optimizer**.  DDP registers
gradient hooks on the parameters that exist when it wraps the model, and the optimizer holds
references to parameters, so swapping layers after either step would silently train (or sync)
stale tensors.  :func:`convfactor.finetune` follows this order when a process group is
initialized: pass it the already-compressed model.

Under torchrun (``torchrun --nproc-per-node 2 script.py``) call :func:`init_from_env` first; in
your own launcher call :func:`init` with an explicit rank, world size and port.  CPU uses the
``gloo`` backend, CUDA ``nccl``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init", "init_from_env", "wrap", "unwrap", "is_main", "cleanup", "free_port"]


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world_size: int, port: int, *, backend: str | None = None, host: str = "127.0.0.1") -> None:
    """Join a process group of ``world_size`` processes rendezvousing at ``host:port``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size)


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialize from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); returns (rank, world)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("RANK/WORLD_SIZE are not set: launch with torchrun, or call convfactor.train.ddp.init()")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def wrap(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    """Wrap an (already factorized) model; build the optimizer on the result's parameters afterwards."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no process group: call init() or init_from_env() first")
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])


def unwrap(model: nn.Module) -> nn.Module:
    """The ordinary module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
