"""BatchNorm folding: an eval-mode BN is merged into the conv / linear whose output it normalizes,
before that layer is factorized.

In eval mode ``BN(y) = s * (y - mean) + beta`` per channel, ``s = gamma / sqrt(var + eps)``, so a
layer ``y = W x + b`` followed by BN equals the layer ``(s W) x + (s (b - mean) + beta)``.  Folding
*before* factorizing matters: the best low-rank fit of the folded kernel ``s W`` is not the folded
best fit of ``W`` (channels with a large ``s`` weigh more in what the network computes); this is
what LRPET (low-rank projection with energy transfer) calls "BN rectification".

Two ways (``fold_bn=`` of :func:`convfactor.compress`, ``mode=`` of :func:`fold_batchnorm`):

* ``True`` (the default of ``compress``; ``"keep"`` is the same): the layer gets ``s W`` (and
  ``s b``), and the BN stays where it was, after the (later factorized) layer, re-initialised to
  the identity plus the folded shift: ``running_mean = 0``, ``running_var = 1 - eps``, ``weight =
  1``, ``bias = beta - s mean`` (without affine parameters: ``running_mean = -(beta - s mean)``).
  In eval mode the model computes the same function; in training mode the BN normalizes with
  batch statistics again, so the compressed model can be fine-tuned with its BNs (un-folding for
  training).  The model's structure, parameter count and state-dict keys do not change, so a plan's
  predicted parameter counts hold exactly and :func:`convfactor.load` needs nothing more.
* ``"remove"``: the BN becomes a :class:`FoldedBatchNorm` (an ``nn.Identity`` that remembers which
  layer it went into) and the layer gets the folded bias (a bias is added if it had none): one
  elementwise pass fewer at inference, and ``N`` fewer parameters per BN than a plan predicted.
  The recipe written by :func:`convfactor.save` records the removed BNs (``"folded_bn"``).

Which BN follows which layer is read from the graph, never from module order.  A pair is folded
only when every available analysis agrees:

* ``torch.fx`` symbolic tracing (conv/linear/BN modules kept as leaves): the BN's only argument is
  the layer's output node, which has no other user, and each module is called once;
* with an example input, a forward pass with hooks and a ``TorchFunctionMode``: the BN's input
  tensor *is* the layer's output tensor, no torch function outside that BN's forward reads it
  (metadata such as ``.shape`` aside), it is not part of the model's output, and each module runs
  once.  A Linear must give a ``(batch, features)`` output, so that BN's channel axis is its
  feature axis; without an example input a Linear is not folded.

Never folded, with the reason in the returned :class:`FoldRecord`: a BN in training mode (it uses
batch statistics; call ``model.eval()`` first), without running statistics, or a lazy one not yet
initialised; a layer whose ``forward`` is not the torch class's own (a subclass such as timm's
``StdConv2d`` may transform its weight), or with hooks or parametrizations (e.g. weight norm); a
layer not selected for compression.  The model is changed in place: :func:`convfactor.compress`
folds into the copy it makes, never into the caller's model.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves

from ..spec.convspec import ConvSpec, is_conv
from ..utils import as_inputs, eval_mode
from .calibration import clone_tree
from .safety import seeded
from .surgery import Placeholder, candidate_layers, set_submodule

__all__ = ["FoldRecord", "FoldResult", "FoldedBatchNorm", "fold_batchnorm", "folded_copy", "accepted_layers",
           "find_pairs", "check_fold_mode", "folded_of", "restore_folds", "bn_affine", "scale_outputs", "FOLD_MODES"]

#: the values ``fold_bn=`` takes
FOLD_MODES = (True, False, "keep", "remove")
#: forward methods of the layer classes whose output is ``W x + b`` (folding rescales W and b)
_PLAIN_FORWARDS = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                           nn.ConvTranspose3d, nn.Linear)}
#: torch functions that read a tensor's metadata, not its values: not a "use" of a layer's output
_METADATA = {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "size", "dim", "numel",
             "is_contiguous", "stride", "is_floating_point"}


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNorm: the layer it was (or would have been) folded into, and why not, if not.
    ``selected``: that layer is one of those to fold into (a BN after anything else: False)."""

    bn: str
    layer: str | None
    folded: bool
    reason: str | None = None
    selected: bool = True


@dataclass
class FoldResult:
    """What :func:`fold_batchnorm` did: one record per BatchNorm, and ``problem`` when the graph
    could not be read at all (then nothing was folded)."""

    records: list[FoldRecord] = field(default_factory=list)
    problem: str | None = None

    @property
    def folded(self) -> list[FoldRecord]:
        return [r for r in self.records if r.folded]

    def notes(self) -> list[str]:
        """One line per outcome, for a report: how many BNs were folded, and, grouped by reason,
        those after a selected layer that were not."""
        out = [f"BatchNorm not folded: {self.problem}"] if self.problem else []
        if self.folded:
            out.append(f"folded {len(self.folded)} BatchNorm(s) into the layer before each (fold_bn)")
        by_reason: dict[str, list[str]] = {}
        for r in self.records:
            if r.selected and not r.folded:
                by_reason.setdefault(r.reason or "", []).append(r.bn)
        for reason, names in by_reason.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            out.append(f"BatchNorm not folded ({reason}): {', '.join(names[:3])}{more}")
        return out


class FoldedBatchNorm(Placeholder):
    """Where a BatchNorm was: it has been folded into ``into`` (a layer name), so it passes its input on."""

    shown = "folded into {!r}"


def check_fold_mode(mode) -> None:
    """``True`` (= ``"keep"``), ``"remove"`` or ``False``; anything else is a ValueError."""
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in FOLD_MODES):
        raise ValueError(f"fold_bn must be True (= 'keep'), 'remove' or False, got {mode!r}")


# ---------------------------------------------------------------------------- entry points
def fold_batchnorm(model: nn.Module, example_input=None, *, layers: Iterable[str] | None = None,
                   mode: bool | str = True) -> FoldResult:
    """Fold every eval-mode BN that directly follows one of ``layers`` (names; default: every
    Conv/ConvTranspose/Linear candidate) into it, **in place**.  ``mode``: ``True`` / ``"keep"`` (the
    BN kept, identity-initialised), ``"remove"`` (BN -> identity) or ``False`` (nothing).
    ``example_input`` (never modified) enables the forward-pass analysis, and is needed to fold into
    a Linear."""
    check_fold_mode(mode)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if mode is False or not bns:
        return FoldResult()
    if all(bn.training for bn in bns):
        return FoldResult(problem="every BatchNorm is in training mode (it normalizes with batch statistics); "
                                  "call model.eval() first to fold them")
    allowed = set(candidate_layers(model) if layers is None else layers)
    pairs, unpaired, problem = find_pairs(model, example_input)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    records = [replace(r, selected=r.layer in allowed) for r in unpaired]
    for layer_name, bn_name in pairs:
        reason = _refusal(model, layer_name, bn_name, allowed)
        if reason is None:
            _fold_pair(model, layer_name, bn_name, mode)
        records.append(FoldRecord(bn_name, layer_name, reason is None, reason, layer_name in allowed))
    return FoldResult(sorted(records, key=lambda r: order.get(r.bn, len(order))), problem)


def accepted_layers(model: nn.Module, chosen: dict) -> list[str]:
    """The names in ``chosen`` (layer name -> rule) whose rule's method accepts the layer: the layers
    to fold into, so that a layer skipped as unsupported stays exactly as it was."""
    out = []
    for name, rule in chosen.items():
        try:
            rule.method.check(ConvSpec.from_module(model.get_submodule(name)))
        except ValueError:                  # UnsupportedLayer, or a layer ConvSpec cannot describe
            continue
        out.append(name)
    return out


def folded_copy(model: nn.Module, example_input=None, *, mode: bool | str = True) -> nn.Module:
    """A deep copy of ``model`` with its BNs folded into every candidate layer (``model`` unchanged)."""
    check_fold_mode(mode)
    work = copy.deepcopy(model)
    fold_batchnorm(work, example_input, mode=mode)
    return work


def folded_of(model: nn.Module) -> dict[str, str]:
    """``{bn name: layer name}`` of the BNs folded away (``fold_bn="remove"``): what a recipe records."""
    return {name: m.into for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm)}


def restore_folds(model: nn.Module, folded: dict[str, str]) -> None:
    """Redo the structure of :func:`folded_of`'s record on an unfolded ``model`` (for loading): each BN
    becomes a :class:`FoldedBatchNorm` and its layer gets a (zero) bias if it had none.  The values
    come from the saved state."""
    for bn_name, layer_name in folded.items():
        try:
            bn, layer = model.get_submodule(bn_name), model.get_submodule(layer_name)
        except AttributeError:
            raise ValueError(f"the recipe folds BatchNorm {bn_name!r} into {layer_name!r}, "
                             f"which the base model does not have") from None
        if not isinstance(bn, (_BatchNorm, FoldedBatchNorm)):
            raise ValueError(f"the recipe folds {bn_name!r}, which is a {type(bn).__name__}, not a BatchNorm")
        set_submodule(model, bn_name, FoldedBatchNorm(layer_name))
        if getattr(layer, "bias", True) is None:
            layer.bias = nn.Parameter(torch.zeros(ConvSpec.from_module(layer).out_channels,
                                                  dtype=layer.weight.dtype, device=layer.weight.device))


# ---------------------------------------------------------------------------- which BN follows which layer
def find_pairs(model: nn.Module, example_input=None
               ) -> tuple[list[tuple[str, str]], list[FoldRecord], str | None]:
    """``(pairs, records, problem)``: ``(layer, bn)`` names where the BN's input is exactly the
    layer's output and nothing else reads it, by every analysis that ran (see the module docstring);
    a record for each other BN, with the reason; ``problem``: why no analysis could run, or None."""
    traced, fx_problem = _fx_pairs(model)
    hooked, hook_problem = _hook_pairs(model, example_input) if example_input is not None else \
        (None, "no example input was given")
    found = [f for f in (traced, hooked) if f is not None]
    if not found:
        return [], [], f"{fx_problem}, and {hook_problem}"
    pairs, records = [], []
    for bn in (n for n, m in model.named_modules() if isinstance(m, _BatchNorm)):
        layers = {f.layers.get(bn) for f in found}
        problems = [f.reasons[bn] for f in found if bn in f.reasons]
        if hooked is None and any(isinstance(model.get_submodule(x), nn.Linear) for x in layers if x):
            problems.append("a Linear is folded only with an example input (its output must be (batch, features))")
        if len(layers) == 1 and None not in layers and not problems:
            pairs.append((layers.pop(), bn))
        else:
            layer = next((x for x in layers if x is not None), None)
            why = problems[0] if problems else "the graph analyses disagree on its input"
            records.append(FoldRecord(bn, layer, False, why))
    return pairs, records, None


@dataclass
class _Pairing:
    """What one analysis found: bn -> the layer feeding it, and bn -> why it cannot be folded."""

    layers: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def decide(self, bn: str, layer: str | None, reason: str | None) -> None:
        if layer is not None:
            self.layers[bn] = layer
        if reason is not None:
            self.reasons[bn] = reason


class _LeafTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every conv / linear (subclasses too) and BN as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_layer(m) or isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _is_layer(m) -> bool:
    return is_conv(m) or isinstance(m, nn.Linear)


def _fx_pairs(model: nn.Module) -> tuple[_Pairing | None, str | None]:
    """The pairing read from a ``torch.fx`` trace, or ``(None, why tracing failed)``."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:              # noqa: BLE001 - any failure to trace means "no fx analysis"
        first_line = (str(exc).splitlines() or [""])[0][:120]
        return None, f"symbolic tracing failed ({type(exc).__name__}: {first_line})"
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    found = _Pairing()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and _is_layer(modules.get(src.target))):
            found.decide(node.target, None, "its input is not the output of a conv or linear layer")
        elif calls[src.target] != 1 or calls[node.target] != 1:
            found.decide(node.target, src.target, f"{src.target} or the BatchNorm is called more than once")
        elif len(src.users) != 1:
            found.decide(node.target, src.target, f"the output of {src.target} is also used elsewhere")
        else:
            found.decide(node.target, src.target, None)
    return found, None


class _Watch(TorchFunctionMode):
    """During one forward pass: each layer's output tensor, each BN's input, and which layer outputs
    are read by anything other than the BN they go into (see :func:`_hook_pairs`)."""

    def __init__(self):
        super().__init__()
        self.produced: dict[int, tuple[str, torch.Tensor]] = {}     # id(output) -> (layer, output)
        self.calls: Counter = Counter()
        self.fed: dict[str, list[str | None]] = {}                  # bn -> producer of each input
        self.consumers: Counter = Counter()                         # layer -> BN calls reading its output
        self.other_use: set[str] = set()
        self.active: list[torch.Tensor] = []                        # inputs of the BNs running now
        self.shapes: dict[str, int] = {}                            # layer -> output ndim

    def producer(self, t) -> str | None:
        entry = self.produced.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            name = self.producer(t)
            if name is not None and not any(t is a for a in self.active) and not _is_metadata(func):
                self.other_use.add(name)
        return func(*args, **kwargs)

    def layer_hook(self, name: str):
        def hook(module, args, out):
            self.calls[name] += 1
            if isinstance(out, torch.Tensor):
                self.produced[id(out)] = (name, out)
                self.shapes[name] = out.ndim
        return hook

    def bn_pre_hook(self, name: str):
        def hook(module, args):
            self.calls[name] += 1
            source = self.producer(args[0]) if len(args) == 1 else None
            self.fed.setdefault(name, []).append(source)
            if source is not None:
                self.consumers[source] += 1
            self.active.append(args[0] if args else None)
        return hook

    def bn_post_hook(self, module, args, out):
        self.active.pop()


def _is_metadata(func) -> bool:
    name = resolve_name(func) or getattr(func, "__name__", "")
    parts = name.split(".")
    return len(parts) >= 2 and (parts[-1] in _METADATA or (parts[-1] == "__get__" and parts[-2] in _METADATA))


def _hook_pairs(model: nn.Module, example_input) -> tuple[_Pairing | None, str | None]:
    """The pairing observed in one eval-mode forward pass on a copy of ``example_input`` (the random
    generator seeded and restored), or ``(None, why the pass failed)``."""
    watch = _Watch()
    handles = []
    for name, m in model.named_modules():
        if _is_layer(m):
            handles.append(m.register_forward_hook(watch.layer_hook(name)))
        elif isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(watch.bn_pre_hook(name)))
            handles.append(m.register_forward_hook(watch.bn_post_hook))
    inputs = clone_tree(as_inputs(example_input))
    try:
        with torch.no_grad(), eval_mode(model), seeded(), watch:
            out = model(*inputs)
    except Exception as exc:              # noqa: BLE001 - no hook analysis; the model's own error surfaces later
        return None, f"the forward pass with hooks failed ({type(exc).__name__})"
    finally:
        for h in handles:
            h.remove()
    watch.other_use.update(n for n in map(watch.producer, tree_leaves(out)) if n is not None)
    return _judge(watch, model), None


def _judge(watch: _Watch, model: nn.Module) -> _Pairing:
    """Turn what :class:`_Watch` saw into a pairing."""
    found = _Pairing()
    for bn in (n for n, m in model.named_modules() if isinstance(m, _BatchNorm)):
        sources = watch.fed.get(bn, [])
        layer = sources[0] if len(set(sources)) == 1 else None
        if not sources:
            found.decide(bn, None, "it does not run on the example input")
        elif layer is None:
            found.decide(bn, None, "its input is not the output of a conv or linear layer")
        elif watch.calls[layer] != 1 or watch.calls[bn] != 1:
            found.decide(bn, layer, f"{layer} or the BatchNorm runs more than once")
        elif watch.consumers[layer] != 1 or layer in watch.other_use:
            found.decide(bn, layer, f"the output of {layer} is also used elsewhere")
        elif isinstance(model.get_submodule(layer), nn.Linear) and watch.shapes.get(layer) != 2:
            found.decide(bn, layer, f"{layer} is a Linear with a {watch.shapes.get(layer)}-D output "
                                    f"(the BatchNorm's channel axis is not its feature axis)")
        else:
            found.decide(bn, layer, None)
    return found


# ---------------------------------------------------------------------------- the fold itself
def _refusal(model: nn.Module, layer_name: str, bn_name: str, allowed: set[str]) -> str | None:
    """Why the found pair cannot be folded, or None."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    if layer_name not in allowed:
        return f"{layer_name} is not selected for compression"
    if bn.training:
        return "the BatchNorm is in training mode (it normalizes with batch statistics); call model.eval() to fold"
    if getattr(bn, "running_mean", None) is None or not bn.track_running_stats or _is_uninitialized(bn):
        return "the BatchNorm has no running statistics"
    if type(layer).forward not in _PLAIN_FORWARDS:
        return f"{layer_name} ({type(layer).__name__}) has its own forward, which may not be linear in its weight"
    if _has_hooks(layer) or _has_hooks(bn) or hasattr(layer, "parametrizations"):
        return f"{layer_name} or the BatchNorm has hooks or parametrizations"
    if isinstance(layer, nn.Linear) and bn.num_features != layer.out_features:
        return f"{layer_name} has {layer.out_features} features, the BatchNorm {bn.num_features}"
    return None


def _is_uninitialized(bn: nn.Module) -> bool:
    return any(isinstance(b, nn.parameter.UninitializedBuffer) for b in bn.buffers())


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, shift)`` in float64 with ``BN(y) = s * y + shift`` in eval mode: ``s = gamma / sqrt(var +
    eps)``, ``shift = beta - s * mean`` (``gamma = 1``, ``beta = 0`` without affine parameters)."""
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - scale * mean


def scale_outputs(weight: torch.Tensor, scale: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """``weight`` with output channel ``n`` multiplied by ``scale[n]`` (float64).

    ``weight: (N, C/g, *k)`` (or ``(out, in)``), or a transposed conv's ``(C, N/g, *k)``."""
    w = weight.detach().double()
    if spec.transposed:
        g = spec.groups
        grouped = w.reshape(g, spec.in_per_group, spec.out_per_group, -1)
        return (grouped * scale.reshape(g, 1, spec.out_per_group, 1)).reshape(w.shape)
    return w * scale.reshape(-1, *([1] * (w.dim() - 1)))


def _fold_pair(model: nn.Module, layer_name: str, bn_name: str, mode: bool | str) -> None:
    """Fold ``bn_name`` into ``layer_name`` (see the module docstring for the two modes)."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    spec = ConvSpec.from_module(layer)
    scale, shift = bn_affine(bn)
    dtype, device = layer.weight.dtype, layer.weight.device
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    layer.weight = nn.Parameter(scale_outputs(layer.weight, scale, spec).to(dtype), layer.weight.requires_grad)
    if mode == "remove":
        layer.bias = nn.Parameter((scale * bias + shift).to(dtype=dtype, device=device))
        set_submodule(model, bn_name, FoldedBatchNorm(layer_name))
        return
    if layer.bias is not None:
        layer.bias = nn.Parameter((scale * bias).to(dtype), layer.bias.requires_grad)
    _reset_to_shift(bn, shift)


@torch.no_grad()
def _reset_to_shift(bn: _BatchNorm, shift: torch.Tensor) -> None:
    """``bn`` as a fresh BN computing ``y + shift`` in eval mode: ``running_var = 1 - eps`` (so that
    ``sqrt(var + eps) = 1``), ``weight = 1``, the shift in ``bias``; without affine parameters,
    ``running_mean = -shift``.  Its state-dict keys stay the same."""
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.zero_()
    if bn.weight is None:
        bn.running_mean.copy_(-shift.to(bn.running_mean.dtype))
        return
    bn.running_mean.zero_()
    bn.weight.fill_(1.0)
    bn.bias.copy_(shift.to(bn.bias.dtype))
