"""Safe surgery: is a layer's parent still correct once the layer is swapped for another module?

Some modules read a child's parameters directly instead of calling it: ``nn.MultiheadAttention``
passes ``out_proj.weight`` to ``F.multi_head_attention_forward``, spandrel's SPAN re-parameterizes
``self.conv[0].weight`` into a fused conv on every eval forward.  Replacing such a child by a
factorized chain (which has no ``.weight``) breaks the model, or silently changes what it computes.

What we chose, and why.  A replacement could instead carry a read-only dense ``.weight`` view, but
that only helps parents that read the weight and then use it exactly as the layer would; SPAN
*writes* another conv's weight from it, and a parent that reads ``.in_features`` or calls
``._conv_forward`` would still break.  So the layer is left dense, with a reason, and the check is
general rather than a list of class names:

* every selected layer is swapped, all at once, for a *stand-in*: a module that computes exactly
  what the layer computes (it calls the original) but, like a factorized replacement, has no
  ``.weight``, ``.bias``, ``.in_channels``, ...  A read of such a public attribute is logged with
  the module that made it (found on the call stack) and then answered from the original layer, so
  the pass goes on and one pass finds every read; a private one (``._conv_forward``) fails as it
  would after the swap;
* the model runs once on (a copy of) the example input and its output is compared with the output
  of the original (captured in the same pass that records each layer's input).  In the common case
  there is no read and the output is identical: the whole check costs one forward pass;
* layers whose attributes were read are skipped ("``blocks.0.attn`` (Attention) reads
  ``.weight`` of this layer directly") and the pass is repeated once without them;
* an exception or a different output without any logged read (a parent that branches on the
  child's type, say) is located per parent: each parent runs on its own captured input, with and
  without its stand-in children, and the children of a parent whose output changes are skipped.
  A model whose output changes although no single parent does is checked one layer at a time.

``nn.MultiheadAttention`` is recognised up front (:func:`convfactor.compression.surgery.layer_problems`),
so this also holds without an example input; every other case needs one, and without it
:func:`convfactor.compress` says in its report that the check did not run.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..utils import eval_mode
from .calibration import clone_tree

__all__ = ["unsafe_layers", "StandIn", "output_mismatch", "seeded"]

#: outputs are compared with this relative tolerance (the stand-in runs the very same operations)
RTOL = 1e-6


class _ReadLog:
    """The attribute reads stand-ins saw: ``{layer name: (attribute, reader)}``, first read only."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.reads: dict[str, tuple[str, str]] = {}

    def record(self, name: str, attr: str) -> None:
        if name not in self.reads:
            self.reads[name] = (attr, self._reader())

    def _reader(self) -> str:
        """The nearest module on the call stack that is not a stand-in: ``'name (Class)'``."""
        frame = sys._getframe(3)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and not isinstance(owner, StandIn):
                name = self.names.get(id(owner))
                label = "the model" if name == "" else (f"`{name}`" if name else "a module")
                return f"{label} ({type(owner).__name__})"
            frame = frame.f_back
        return "code outside the model"


class StandIn(nn.Module):
    """Computes what ``layer`` computes, but has none of its attributes (as a factorized replacement
    has not): a read of a public one is logged in ``log`` and answered from ``layer``; a read of a
    private one raises AttributeError."""

    def __init__(self, name: str, layer: nn.Module, log: _ReadLog):
        super().__init__()
        self.inner = layer
        object.__setattr__(self, "_standin_name", name)
        object.__setattr__(self, "_standin_log", log)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, attr: str):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            pass
        if not attr.startswith("_"):
            self._standin_log.record(self._standin_name, attr)
            return getattr(self.inner, attr)
        raise AttributeError(f"{self._standin_name!r} is being replaced; a replacement has no attribute {attr!r}")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class _Swapped:
    """Context: the named layers of ``model`` replaced by stand-ins, put back on exit."""

    def __init__(self, model: nn.Module, names: Iterable[str], log: _ReadLog):
        self.model, self.names, self.log = model, list(names), log
        self.originals = {n: model.get_submodule(n) for n in self.names}

    def __enter__(self):
        for name, layer in self.originals.items():
            _set(self.model, name, StandIn(name, layer, self.log))
        return self

    def __exit__(self, *exc):
        for name, layer in self.originals.items():
            _set(self.model, name, layer)
        return False


def output_mismatch(got: Any, want: Any, where: str = "output") -> str | None:
    """Why ``got`` differs from ``want`` (nested tensors, tuples, lists, dicts), or None if equal."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"{where}: shape {tuple(getattr(got, 'shape', ()))} instead of {tuple(want.shape)}"
        if want.is_floating_point() or want.is_complex():
            scale = want.detach().abs().max().item() if want.numel() else 0.0
            same = torch.allclose(got, want, rtol=RTOL, atol=RTOL * scale, equal_nan=True)
        else:
            same = torch.equal(got, want)
        return None if same else f"{where} differs"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(want):
            return f"{where}: different keys"
        return next((m for k in want if (m := output_mismatch(got[k], want[k], f"{where}[{k!r}]"))), None)
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{where}: different structure"
        return next((m for i, (g, w) in enumerate(zip(got, want)) if (m := output_mismatch(g, w, f"{where}[{i}]"))),
                    None)
    try:
        return None if bool(got == want) else f"{where} differs"
    except Exception:               # noqa: BLE001 - objects without a usable ==: structure already matched
        return None


@contextlib.contextmanager
def seeded(seed: int = 0):
    """The CPU random generator seeded with ``seed``, and restored afterwards: two passes of a model
    that draws random numbers in eval mode draw the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad(), seeded():
        return module(*clone_tree(args), **clone_tree(kwargs))


def _run(module: nn.Module, args: tuple, kwargs: dict, want: Any) -> str | None:
    """Run ``module`` on copies of ``args``/``kwargs``; why its output is not ``want``, or None."""
    try:
        got = _call(module, args, kwargs)
    except Exception as exc:        # noqa: BLE001 - any failure of the parent is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return output_mismatch(got, want)


def unsafe_layers(model: nn.Module, names: Iterable[str], example_input: tuple, reference: Any) -> dict[str, str]:
    """``{name: reason}`` for each named layer that cannot be replaced without changing ``model``.

    ``example_input``: the model's positional inputs (a tuple); ``reference``: the model's output on
    them.  ``model`` is run in eval mode and is left as it was.  See the module docstring.
    """
    remaining = list(dict.fromkeys(names))
    unsafe: dict[str, str] = {}
    with eval_mode(model):
        while remaining:
            log = _ReadLog(model)
            with _Swapped(model, remaining, log):
                problem = _run(model, example_input, {}, reference)
            for name, (attr, reader) in log.reads.items():
                unsafe[name] = f"{reader} reads .{attr} of this layer directly, so it cannot be replaced"
            remaining = [n for n in remaining if n not in log.reads]
            if problem is None or not remaining:
                break
            if not log.reads:
                unsafe.update(_locate(model, remaining, example_input, reference, problem))
                break
    return unsafe


def _locate(model: nn.Module, names: list[str], example_input: tuple, reference: Any, problem: str) -> dict[str, str]:
    """The layers behind a failed whole-model check: per parent first, then one layer at a time."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        by_parent.setdefault(name.rpartition(".")[0], []).append(name)
    calls = _parent_calls(model, list(by_parent), example_input)
    found: dict[str, str] = {}
    for parent_name, children in by_parent.items():
        if parent_name not in calls:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        args, kwargs = calls[parent_name]
        try:
            want = _call(parent, args, kwargs)
        except Exception:           # noqa: BLE001 - a parent that cannot run alone is not the culprit
            continue
        for child in children:
            with _Swapped(model, [child], _ReadLog(model)):
                why = _run(parent, args, kwargs, want)
            if why is not None:
                found[child] = (f"its parent `{parent_name or 'the model'}` ({type(parent).__name__}) does not "
                                f"give the same output once this layer is replaced ({why})")
    if found:
        return found
    for name in names:
        with _Swapped(model, [name], _ReadLog(model)):
            why = _run(model, example_input, {}, reference)
        if why is not None:
            found[name] = f"the model does not give the same output once this layer is replaced ({why})"
    return found or {n: f"the model does not give the same output once these layers are replaced ({problem})"
                     for n in names}


@torch.no_grad()
def _parent_calls(model: nn.Module, parent_names: list[str], example_input: tuple) -> dict[str, tuple]:
    """``{parent name: (args, kwargs)}`` of each parent's first call on ``example_input`` (copies,
    so that later in-place operations cannot change them)."""
    calls: dict[str, tuple] = {}
    handles = []
    for name in parent_names:
        module = model.get_submodule(name) if name else model

        def before(mod, args, kwargs, name=name):
            if name not in calls:
                calls[name] = (clone_tree(args), clone_tree(kwargs))
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
    try:
        model(*clone_tree(example_input))
    finally:
        for handle in handles:
            handle.remove()
    return calls
