"""A speed comparison timed in a fresh Python process, so process-wide settings (the allocator) start clean.

:func:`compare_in_fresh_process` saves the compressed model to a temporary directory and runs this
module from the checkout root; a person can run it by hand too::

    python -m benchmarks.fresh_timing dncnn DIR --input-shape 1x1x24x24 --threads 1 --repeats 3 --malloc default

It loads the zoo model with its shipped weights and ``DIR`` (written by :func:`convfactor.save`) on
top of the same model, runs :func:`convfactor.measure.compare.compare_speed` (3 rounds) and prints
``RESULT {json}`` (``SpeedComparison.to_dict()``) as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

#: the checkout root: ``python -m benchmarks.fresh_timing`` runs there, so ``benchmarks`` is importable
ROOT = Path(__file__).resolve().parents[1]
MALLOC_MODES = ("default", "retain", "preload")


def compare_in_fresh_process(model_name: str, compressed: nn.Module, input_shape, *, threads: int = 2,
                             repeats: int = 9, malloc: str = "default", timeout: float = 900.0,
                             backend: str = "torch", env: dict[str, str] | None = None) -> dict:
    """``compare_speed`` of the zoo model ``model_name`` (shipped weights) against ``compressed``,
    run in a new Python process (``python -m benchmarks.fresh_timing``).

    ``malloc``: ``"default"``/``"retain"`` (set by mallopt there; a preload this process inherited is
    not passed on), or ``"preload"`` to leave the allocator as ``env`` makes it (e.g. ``{"LD_PRELOAD":
    ".../libtcmalloc_minimal.so.4"}``); the result's ``env["malloc"]`` records what was loaded.
    ``compressed`` is saved with :func:`convfactor.save` to a temporary directory and loaded there.
    Returns ``SpeedComparison.to_dict()``.
    """
    from convfactor import save
    child = child_env(malloc, env)          # a bad malloc mode fails before anything is saved
    with tempfile.TemporaryDirectory() as tmp:
        save(compressed, f"{tmp}/model")
        argv = [sys.executable, "-m", "benchmarks.fresh_timing", model_name, f"{tmp}/model",
                "--input-shape", "x".join(str(int(v)) for v in input_shape), "--threads", str(threads),
                "--repeats", str(repeats), "--malloc", malloc, "--backend", backend]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"timing in a fresh process failed:\n{res.stderr[-2000:]}")
    line = next((v for v in reversed(res.stdout.splitlines()) if v.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the fresh timing process printed no RESULT line:\n{res.stdout[-2000:]}")
    return json.loads(line[len("RESULT "):])


def child_env(malloc: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh timing process: glibc modes drop an inherited ``LD_PRELOAD``/``MALLOC_CONF``
    (a command re-executed under tcmalloc would otherwise pass it on and mislabel the figure)."""
    if malloc not in MALLOC_MODES:
        raise ValueError(f"malloc must be 'default', 'retain' or 'preload', got {malloc!r}")
    env = dict(os.environ)
    if malloc != "preload":
        for key in ("LD_PRELOAD", "MALLOC_CONF"):
            env.pop(key, None)
    env.update(extra or {})
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fresh_timing",
                                description="Time a zoo model (shipped weights) against a saved compressed copy.")
    p.add_argument("model", help="zoo model name, e.g. dncnn")
    p.add_argument("directory", help="the compressed model, written by convfactor.save")
    p.add_argument("--input-shape", required=True, help="e.g. 1x3x64x64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--malloc", choices=MALLOC_MODES, default="default",
                   help="default/retain: set by mallopt here; preload: keep what LD_PRELOAD loaded")
    p.add_argument("--backend", default="torch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import convfactor
    from convfactor import models
    from convfactor.measure.allocator import set_malloc
    from convfactor.measure.compare import compare_speed
    if args.malloc != "preload":
        set_malloc(args.malloc)
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    original = models.get(args.model, pretrained=True)
    compressed = convfactor.load(args.directory, models.get(args.model))
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    res = compare_speed(original, compressed, x, threads=args.threads, repeats=args.repeats, rounds=3,
                        backend=args.backend)
    print("RESULT " + json.dumps(res.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
