"""Small context managers shared by every layer (a leaf: imports nothing from convfactor).

They replace the save/restore of torch's thread count and of a model's train/eval mode that
would otherwise be written out at every timing, capture and evaluation site.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["torch_threads", "eval_mode", "UnknownName", "plain_data", "cpu_has", "format_si"]


class UnknownName(KeyError):
    """A name the user gave (a model, a method, an image) that is not known.  The CLI reports it
    as a one-line error; any other ``KeyError`` is a bug and keeps its traceback."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def parse_configured(text: str, what: str = "name") -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``(name, options)``, values read as YAML scalars
    (``sliced_svd:slices=4``, ``openvino:precision=bf16``); a malformed item is one ValueError line."""
    import yaml
    name, _, rest = str(text).partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{what} {text!r}: options are key=value pairs separated by commas, got {item!r}")
        options[key.strip()] = yaml.safe_load(value.strip())
    return name.strip(), options


def as_inputs(example_input: Any) -> tuple:
    """A model's positional inputs as a tuple: ``x`` -> ``(x,)``; a tuple stays as it is."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: keep the current count),
    restoring the previous count afterwards; yields the count in force."""
    previous = torch.get_num_threads()
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block and restore each one's own train/eval flags
    (every submodule's, not just the top's) afterwards."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for flags in saved:
            for module, training in flags:
                module.training = training


def plain_data(value: Any, *, nan: Any = float("nan")) -> Any:
    """``value`` as plain Python for JSON/YAML writers: dict keys as str, tuples as lists, tensors
    and numpy arrays as (nested) lists, numpy/torch scalars as numbers, and NaN floats as ``nan``
    (kept by default; YAML's safe_dump callers pass ``nan=None``)."""
    if isinstance(value, dict):
        return {str(k): plain_data(v, nan=nan) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, nan=nan) for v in value]
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return plain_data(value.tolist(), nan=nan)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return nan
    return value


def format_si(n: float) -> str:
    """A count for a table: ``1.23G``, ``4.56M``, ``7.89k`` (two decimals), or the integer below 1000."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


#: CPU flags any of which means bf16 runs natively (AVX512-BF16, or AMX tiles)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_problem() -> str | None:
    """Why this CPU cannot run bf16 natively, or None when it can (one reason for every runtime)."""
    if cpu_has(*BF16_FLAGS):
        return None
    return "bf16 needs a CPU with AVX512-BF16 or AMX (neither avx512_bf16 nor amx_bf16 is in /proc/cpuinfo)"


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists any of ``flags`` (e.g. ``"avx512f"``); False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            listed = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in listed for flag in flags)
