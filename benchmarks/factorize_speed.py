"""Wall time to factorize every conv kernel of a ResNet-50-shaped network, per method.

The 53 conv shapes of torchvision's ResNet-50 (v1.5: stride on the 3x3) at 224x224 input are
built here with seeded random weights (the time of a factorization does not depend on training).
Every available conv method factorizes each kernel it supports at ``macs_ratio=0.5`` (at the
layer's real input size), falling back to half its full rank where 0.5 is unreachable; the time
is that of :func:`convfactor.factorize` (fit + building the replacement), summed over layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from convfactor import factorize
from convfactor.measure.latency import environment
from convfactor.methods import registry
from convfactor.spec.convspec import ConvSpec, UnsupportedLayer
from convfactor.utils import torch_threads

from .markdown import heading, table
from .section import Section

TITLE = "Whole-network factorization time (ResNet-50 shapes)"

#: targets from issue 2, seconds on 2 threads
TARGETS = {"channel_svd": 5.0, "spatial_svd": 5.0, "tucker2": 5.0, "cp": 60.0}


def resnet50_convs(image: int = 224) -> list[dict]:
    """``[{name, cin, cout, k, stride, padding, hw}]`` for the 53 convs of ResNet-50 (``hw``: input size)."""
    convs = [dict(name="conv1", cin=3, cout=64, k=7, stride=2, padding=3, hw=image)]
    hw = image // 4                       # after the stride-2 stem and the max-pool
    cin = 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        for block in range(blocks):
            s = stride if block == 0 else 1
            pre = f"layer{stage}.{block}"
            convs.append(dict(name=f"{pre}.conv1", cin=cin, cout=width, k=1, stride=1, padding=0, hw=hw))
            convs.append(dict(name=f"{pre}.conv2", cin=width, cout=width, k=3, stride=s, padding=1, hw=hw))
            convs.append(dict(name=f"{pre}.conv3", cin=width, cout=4 * width, k=1, stride=1, padding=0, hw=hw // s))
            if block == 0:
                convs.append(dict(name=f"{pre}.downsample.0", cin=cin, cout=4 * width, k=1, stride=s, padding=0, hw=hw))
            cin = 4 * width
            hw = hw // s
    return convs


#: a method whose running total passes this many seconds stops early (reported, not hidden)
BUDGET_S = 120.0


def _methods(quick: bool) -> list[str]:
    names = [m for m in registry.available() if 2 in registry.get(m).supported_dims
             and m not in ("linear_svd", "tt", "lowrank_sparse")]   # ADMM on responses: its own section
    return [m for m in names if m in TARGETS] if quick else names


#: extra rows: (method, options) showing a speed/quality trade-off
EXTRA = [("cp", {"n_iter": 25})]


@dataclass
class Timing:
    """One method's pass over the layers (:func:`time_method`)."""
    seconds: float = 0.0
    layers: int = 0
    skipped: int = 0
    fallback: int = 0                   # layers where macs_ratio=0.5 is unreachable: half the full rank
    slowest: tuple[float, str] = (0.0, "")
    stopped: bool = False               # the running total passed the budget


def _target(m, spec: ConvSpec, layer: nn.Module, size: tuple) -> tuple[dict, bool]:
    """``(factorize target, fell back)``: macs_ratio=0.5 at the layer's input size, else half the full rank."""
    try:
        m.resolve_ranks(spec, layer.weight, macs_ratio=0.5, input_size=size)
    except ValueError:
        return {"rank": m.scaled_ranks(spec, 0.5)}, True
    return {"macs_ratio": 0.5, "input_size": size}, False


def time_method(method: str, layers: list, sizes: list, budget_s: float = BUDGET_S, **options) -> Timing:
    """Sum of :func:`convfactor.factorize` wall times over ``layers`` for one method."""
    m = registry.get(method, **options)
    t = Timing()
    for (name, layer), size in zip(layers, sizes):
        if t.seconds > budget_s:
            t.stopped = True
            break
        spec = ConvSpec.from_module(layer)
        try:
            m.check(spec)
        except UnsupportedLayer:
            t.skipped += 1
            continue
        target, fell_back = _target(m, spec, layer, size)
        t.fallback += fell_back
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                factorize(layer, m, **target)
        except (ValueError, UnsupportedLayer, NotImplementedError):
            t.skipped += 1
            continue
        dt = time.perf_counter() - t0
        t.seconds += dt
        t.layers += 1
        t.slowest = max(t.slowest, (dt, name))
    return t


def resnet50_layers(quick: bool) -> tuple[list[tuple[str, nn.Conv2d]], list[tuple[int, int]]]:
    """``([(name, conv with seeded He-normal weights)], [input size])`` of ResNet-50 (its first 5, quick)."""
    shapes = resnet50_convs()[:5] if quick else resnet50_convs()
    g = torch.Generator().manual_seed(0)
    layers, sizes = [], []
    for s in shapes:
        layer = nn.Conv2d(s["cin"], s["cout"], s["k"], stride=s["stride"], padding=s["padding"], bias=False)
        with torch.no_grad():
            fan_in = s["cin"] * s["k"] ** 2
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        layers.append((s["name"], layer))
        sizes.append((s["hw"], s["hw"]))
    return layers, sizes


@dataclass
class Results:
    quick: bool
    kernels: int
    timings: list[tuple[str, str, Timing]]     # (method, row label, timing)
    env: dict


def measure(quick: bool = False) -> Results:
    threads = 1 if quick else 2
    with torch_threads(threads):
        layers, sizes = resnet50_layers(quick)
        runs = [(m, {}) for m in _methods(quick)] + [(m, o) for m, o in EXTRA if m in _methods(quick)]
        timings = [(method, method + "".join(f", {k}={v}" for k, v in options.items()),
                    time_method(method, layers, sizes, **options)) for method, options in runs]
        env = environment(threads, dtype="float32 weights", batch="n/a", input="224x224 (layer input sizes)")
    return Results(quick, len(layers), timings, env)


def _row(method: str, label: str, t: Timing, quick: bool) -> list:
    target = TARGETS.get(method)
    verdict = "-" if target is None or quick else ("yes" if t.seconds <= target and not t.stopped else "no")
    total = f"{t.seconds:.2f}" + (f" (stopped past {BUDGET_S:.0f} s)" if t.stopped else "")
    return [label, t.layers, t.skipped, t.fallback, total, f"{t.slowest[1]} ({t.slowest[0]:.2f} s)",
            target if target else "-", verdict]


def render(results: Results) -> str:
    out = [*heading(TITLE),
           f"{results.kernels} conv kernels of ResNet-50 (random weights), each factorized at macs_ratio=0.5 "
           "(half the full rank where 0.5 is unreachable: 'fallback'); time of `convfactor.factorize` "
           "(fit + build), summed. Methods with their default options; a method stops once its total passes "
           f"{BUDGET_S:.0f} s.", "",
           *table(["method", "layers", "skipped", "fallback", "total (s)", "slowest layer", "target (s)", "met"],
                  (_row(*timing, results.quick) for timing in results.timings)),
           "", f"Environment: {results.env}", ""]
    if results.quick:
        out.insert(2, "_Quick smoke configuration (first 5 kernels, methods with a target, 1 thread): "
                      "not the reported figures._\n")
    return "\n".join(out)


SECTION = Section("factorize_speed", TITLE, measure, render)
