"""Calibration inputs for data-aware fitting, collected with forward hooks under a memory budget.

:func:`collect_inputs` runs a model on a few batches and keeps, for each named layer, a random
sample of what that layer received:

* conv layers: whole samples ``(B, C, *spatial)``; a sample larger than ``max_bytes / 8`` is
  replaced by a random spatial *crop* (crops are real inputs too, so a fit on them is a fit on the
  data), and samples beyond the budget are dropped by reservoir sampling (uniform over all seen);
* ``nn.Linear`` layers: rows ``(P, in_features)`` (leading axes flattened), reservoir-sampled.

:func:`collect_input_pairs` gives one layer's inputs in two models at once (the original and the
partly compressed copy), cropped alike, for the sequential (asymmetric) fit; :func:`probe_layers`
gives the layers' execution order and which of them feed only a ReLU.

Sampling is seeded, so the same batches give the same calibration set.  The model runs on copies
of the batches (:func:`clone_tree`): a model that scales its input in place (``x *= 255``) must not
change the caller's tensors.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..utils import as_inputs, eval_mode

__all__ = ["collect_inputs", "collect_input_pairs", "probe_layers", "image_facing", "as_batches", "clone_tree"]

#: keep at least this many samples per layer when cropping to the budget
MIN_ITEMS = 8


def clone_tree(value):
    """A copy of every tensor in ``value`` (nested tuples, lists and dicts); other objects as they are.

    Forward passes that only observe a model (capture, calibration, counting) run on such copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):            # a namedtuple
        return type(value)(*(clone_tree(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(clone_tree(v) for v in value)
    if isinstance(value, dict):
        items = {k: clone_tree(v) for k, v in value.items()}
        try:
            return type(value)(items)
        except TypeError:           # a mapping type that needs other constructor arguments
            return items
    return value


def as_batches(calibration) -> list:
    """``calibration`` as a list of model inputs (a tensor, a tuple of tensors, or an iterable of those)."""
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, tuple):
        return [calibration]
    return list(calibration)


class _Reservoir:
    """Uniform sample of at most ``capacity`` items from a stream (Vitter's algorithm R)."""

    def __init__(self, max_bytes: int, generator: torch.Generator, crop: bool):
        self.max_bytes = int(max_bytes)
        self.gen = generator
        self.crop = crop
        self.items: list[torch.Tensor] = []
        self.seen = 0
        self.shape = None

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """Random spatial crop of one sample ``(C, *S)`` to at most ``max_bytes / MIN_ITEMS`` bytes."""
        budget = self.max_bytes / MIN_ITEMS
        nbytes = x.numel() * x.element_size()
        if nbytes <= budget or x.dim() < 2:
            return x
        spatial = x.shape[1:]
        scale = (budget / nbytes) ** (1 / len(spatial))
        sizes = [max(min(s, 4), int(s * scale)) for s in spatial]
        for axis, (s, c) in enumerate(zip(spatial, sizes)):
            start = int(torch.randint(0, s - c + 1, (1,), generator=self.gen))
            x = x.narrow(axis + 1, start, c)
        return x

    def add(self, rows: torch.Tensor) -> None:
        for item in rows:
            item = self._crop(item) if self.crop else item
            if self.shape is None:
                self.shape = tuple(item.shape)
            elif tuple(item.shape) != self.shape:   # differently sized inputs: crop to the first size
                item = _crop_to(item, self.shape)
            capacity = max(1, self.max_bytes // max(1, item.numel() * item.element_size()))
            self.seen += 1
            if len(self.items) < capacity:
                self.items.append(item.detach().clone())
            else:
                j = int(torch.randint(0, self.seen, (1,), generator=self.gen))
                if j < capacity:
                    self.items[j] = item.detach().clone()

    def result(self) -> torch.Tensor:
        if not self.items:
            raise ValueError("no calibration input reached this layer")
        return torch.stack(self.items)


def _crop_to(item: torch.Tensor, shape: tuple) -> torch.Tensor:
    if item.shape[0] != shape[0] or any(a < b for a, b in zip(item.shape[1:], shape[1:])):
        raise ValueError(f"calibration inputs of shapes {tuple(item.shape)} and {shape} cannot be pooled")
    for axis, size in enumerate(shape[1:]):
        item = item.narrow(axis + 1, 0, size)
    return item


@torch.no_grad()
def collect_inputs(model: nn.Module, layer_names: Iterable[str], calibration_batches, *,
                   max_bytes: int = 16 * 2 ** 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{name: inputs}`` of each named layer on ``calibration_batches``, at most ``max_bytes`` per layer.

    ``calibration_batches``: a tensor, a tuple of tensors, or an iterable of those (model inputs).
    Conv layers give ``(S, C, *spatial)`` samples (maybe cropped), Linear layers ``(P, in_features)`` rows.
    The model runs in eval mode; its mode is restored afterwards.
    """
    names = list(dict.fromkeys(layer_names))
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    gen = torch.Generator().manual_seed(seed)
    stores: dict[str, _Reservoir] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        is_linear = isinstance(layer, nn.Linear)
        stores[name] = _Reservoir(max_bytes, gen, crop=not is_linear)

        def hook(mod, args, name=name, is_linear=is_linear):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]) if is_linear else x
            stores[name].add(rows)
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with eval_mode(model):
            for batch in as_batches(calibration_batches):
                model(*clone_tree(as_inputs(batch)))
    finally:
        for h in handles:
            h.remove()
    return {name: stores[name].result() for name in names}



class _Reached(Exception):
    """Raised by a pre-hook once the layer's input is captured: the rest of the forward is not needed."""


def _input_of(model: nn.Module, name: str, batch) -> torch.Tensor:
    """What layer ``name`` of ``model`` receives on ``batch`` (its first call; the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(mod, args):
        seen.append(args[0].detach().clone())
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(*clone_tree(as_inputs(batch)))
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"no calibration input reached {name}")
    return seen[0]


@torch.no_grad()
def collect_input_pairs(reference: nn.Module, model: nn.Module, name: str, calibration_batches, *,
                        max_bytes: int = 32 * 2 ** 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference's inputs, model's inputs)`` of layer ``name`` on the same samples, cropped alike.

    ``model`` is ``reference`` with some layers before ``name`` replaced: the pair is what the
    original layer saw and what it will see (Zhang et al. TPAMI 2016 sec. 3.3).  Each forward stops at
    the layer.  Conv layers give two ``(S, C, *spatial)``, Linear layers two ``(P, in_features)``,
    sampled as :func:`collect_inputs` samples (both halves of a pair travel as one tensor).
    """
    gen = torch.Generator().manual_seed(seed)
    is_linear = isinstance(reference.get_submodule(name), nn.Linear)
    store = _Reservoir(max_bytes, gen, crop=not is_linear)
    with eval_mode(reference), eval_mode(model):
        for batch in as_batches(calibration_batches):
            x_ref, x_now = _input_of(reference, name, batch), _input_of(model, name, batch)
            if x_ref.shape != x_now.shape:
                raise ValueError(f"{name} receives {tuple(x_now.shape)} in the compressed model, "
                                 f"{tuple(x_ref.shape)} in the original")
            if is_linear:
                x_ref, x_now = x_ref.reshape(-1, x_ref.shape[-1]), x_now.reshape(-1, x_now.shape[-1])
            store.add(torch.cat([x_ref, x_now], dim=-1 if is_linear else 1))
    both = store.result()
    half = both.shape[-1 if is_linear else 1] // 2
    return (both[..., :half], both[..., half:]) if is_linear else (both[:, :half], both[:, half:])


#: the calls that apply a ReLU to a tensor
RELU_CALLS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)


def _tensors(value):
    """The tensors in ``value``: a tensor, or nested lists / tuples of them (other items skipped)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _inspects(func) -> bool:
    """Whether ``func`` only reads a tensor's metadata (``.shape``, ``.size()``, ``.dim()``), not its values."""
    return getattr(func, "__name__", "") in ("__get__", "size", "dim", "ndimension")


class _Consumers(TorchFunctionMode):
    """Records, for each watched tensor, every torch function called on it."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, tuple[str, torch.Tensor]] = {}    # id -> (layer name, the tensor, kept alive)
        self.calls: dict[str, set] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _inspects(func):
            for item in _tensors((args, tuple(kwargs.values()))):
                if id(item) in self.watched:
                    self.calls.setdefault(self.watched[id(item)][0], set()).add(func)
        result = func(*args, **kwargs)
        if func in RELU_CALLS and isinstance(result, torch.Tensor) and id(result) in self.watched:
            del self.watched[id(result)]        # an in-place ReLU: the tensor now holds what the ReLU gave
        return result


@torch.no_grad()
def probe_layers(model: nn.Module, names: Iterable[str], batch) -> tuple[list[str], set[str]]:
    """``(names in the order the forward first runs them, names whose output feeds only a ReLU)``.

    One forward of ``batch`` (eval mode) with every torch call watched; a layer whose output is also
    added, concatenated or normalized is not ReLU-fed.  Names the forward never reaches come last.
    """
    names = list(dict.fromkeys(names))
    mode, order = _Consumers(), []

    def hook(mod, args, output, name):
        if name not in order:
            order.append(name)
        if isinstance(output, torch.Tensor):
            mode.watched[id(output)] = (name, output)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    try:
        with eval_mode(model), mode:
            model(*clone_tree(as_inputs(batch)))
    finally:
        for h in handles:
            h.remove()
    relu_fed = {n for n, calls in mode.calls.items() if calls and all(c in RELU_CALLS for c in calls)}
    return order + [n for n in names if n not in order], relu_fed


#: the calls that start a new ancestry (a conv's or Linear's output carries only that layer)
LAYER_CALLS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               torch.conv1d, torch.conv2d, torch.conv3d, F.linear)


class _Ancestry(TorchFunctionMode):
    """Tags each tensor with the convs it comes from through no other conv (``"input"``: the model input)."""

    def __init__(self):
        super().__init__()
        self.tags: dict[int, tuple[frozenset, torch.Tensor]] = {}

    def of(self, value) -> frozenset:
        """The tags of every tensor in ``value`` together."""
        return frozenset().union(*(self.tags[id(t)][0] for t in _tensors(value) if id(t) in self.tags))

    def mark(self, value, tags: frozenset) -> None:
        for item in _tensors(value):
            self.tags[id(item)] = (tags, item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not _inspects(func):
            self.mark(result, frozenset({"@layer"}) if func in LAYER_CALLS else self.of((args, tuple(kwargs.values()))))
        return result


@torch.no_grad()
def image_facing(model: nn.Module, example, names: Iterable[str] | None = None) -> set[str]:
    """The convs that read the model's input through no other conv or Linear, or whose output reaches the
    model's output through none (one forward of ``example``, every torch call followed).

    They read or write the image itself, whatever their channel counts: SRMD's first conv (RGB plus 15
    degradation maps, 18 channels) and its last (12 = 3 x 2² sub-pixels) as much as a 3-channel head.
    ``names``: the convs to consider (default: every Conv module).
    """
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    names = [n for n in (names if names is not None else convs) if n in convs]
    mode, reading = _Ancestry(), set()

    def before(mod, args, name):
        if "input" in mode.of(args):
            reading.add(name)

    def after(mod, args, output, name):
        mode.mark(output, frozenset({name}))

    handles = [h for n in names for h in (
        convs[n].register_forward_pre_hook(lambda m, a, n=n: before(m, a, n)),
        convs[n].register_forward_hook(lambda m, a, o, n=n: after(m, a, o, n)))]
    try:
        with eval_mode(model), mode:
            inputs = clone_tree(as_inputs(example))
            mode.mark(list(inputs), frozenset({"input"}))
            output = model(*inputs)
            writing = set(mode.of(output if isinstance(output, (list, tuple)) else [output]))
    finally:
        for h in handles:
            h.remove()
    return (reading | writing) & set(names)
