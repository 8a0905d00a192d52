"""Run reports: ``report.json`` (the numbers), ``report.md`` and one self-contained ``report.html``
(figures embedded as ``data:image/png;base64`` URIs, no external files, scripts or styles).

:func:`write_report` takes a plain dict; every key is optional, and a section (table + figure) is
rendered only when its data is present::

    title, model, input_shape, env            what was measured, on what
    warnings                                  lines shown first, loudly (a missed target, a slower model)
    totals      {params_before, params_after, macs_before, macs_after}
    layers      [LayerReport dicts]           (CompressionReport.to_dict()["layers"])
    spectra     {layer: {singular_values, kappa, rank}} and kappa_threshold
    latency     [{label, median_ms, iqr_ms, env?}]      per method / per layer
    speed       SpeedComparison.to_dict()
    images      [{label, array | file, psnr?, ssim?}]   crops side by side
    tradeoff    [{label, group?, macs, latency_ms?, quality}] and quality_name
    frontier    {points: [{group, speedup, loss, label?, interval?}], references?: [...], loss_name?}
                measured speed-up vs quality loss, one line per approach or back-end

This package only renders and writes (:mod:`convfactor.report.render`); it measures nothing.
:func:`convfactor.measure.report_data.collect` builds such a dict from an original and a compressed
model (counts, spectra, timings), and :func:`image_panel` lays out image crops with the figures of a
metric its caller passes in (e.g. :mod:`convfactor.measure.quality`'s PSNR/SSIM).
"""
from __future__ import annotations

from io import BytesIO
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..files import atomic_write
from ..utils import plain_data
from .render import FIGURES, fmt, render_figures, render_html, render_markdown

__all__ = ["write_report", "image_panel", "render_markdown", "render_html", "render_figures", "fmt", "FIGURES"]


# ---------------------------------------------------------------------------------- writing
def _store_images(run_dir: Path, images: list[dict]) -> list[dict]:
    """Save each crop's array as ``crops/NN.png``; the JSON keeps the file name, not the pixels."""
    from matplotlib.image import imread, imsave
    stored = []
    (run_dir / "crops").mkdir(exist_ok=True)
    for i, im in enumerate(images):
        im = dict(im)
        if "array" in im:
            raw = im.pop("array")
            a = np.asarray(raw.detach().cpu() if hasattr(raw, "detach") else raw, dtype=float)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = np.moveaxis(a, 0, -1)                     # CHW -> HWC
            a = np.clip(a.squeeze(), 0, 1)
            buf = BytesIO()
            imsave(buf, a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, format="png")
            im["file"] = f"crops/{i:02d}.png"
            atomic_write(run_dir / im["file"], buf.getvalue())
            im["_array"] = a
        elif "file" in im:
            a = imread(str(run_dir / im["file"]))
            im["_array"] = a[..., :3] if a.ndim == 3 else a
        stored.append(im)
    return stored


def write_report(run_dir, data: dict) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``figures/*.png`` into ``run_dir``.

    Returns the paths written.  Figures are rendered from ``data`` (image crops from their arrays
    or files); the JSON holds every number the tables show.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = dict(data)
    images = _store_images(run_dir, data.get("images") or []) if data.get("images") else []
    json_data = plain_data({k: v for k, v in data.items() if k != "images"})
    if images:
        json_data["images"] = [{k: plain_data(v) for k, v in im.items() if k != "_array"} for im in images]
    render_data = dict(json_data)
    if images:
        render_data["images"] = [dict(j, array=im["_array"]) for j, im in zip(json_data["images"], images)]
    pngs = render_figures(render_data)
    (run_dir / "figures").mkdir(exist_ok=True)
    files = {}
    for name, png in pngs.items():
        files[name] = f"figures/{name}.png"
        atomic_write(run_dir / files[name], png)
    atomic_write(run_dir / "report.json", json.dumps(json_data, indent=2))
    atomic_write(run_dir / "report.md", render_markdown(json_data, files))
    atomic_write(run_dir / "report.html", render_html(json_data, pngs))
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html"}
    paths.update({f"figure:{n}": run_dir / f for n, f in files.items()})
    return paths


def image_panel(ground_truth, outputs: dict, crop: tuple[int, int, int, int] | None = None,
                data_range: float = 1.0, *, metrics: Callable[[torch.Tensor, torch.Tensor], dict]) -> list[dict]:
    """``images`` entries for :func:`write_report`: the ground truth then each output, cropped to
    ``crop = (top, left, height, width)``; each output's figures are over the *whole* image.

    ``ground_truth`` and the outputs: ``(C, H, W)`` or ``(1, C, H, W)`` tensors in ``[0, data_range]``.
    ``metrics(output, ground_truth) -> {name: value}`` on the rescaled ``(C, H, W)`` float64 images in
    [0, 1] gives each output's figures: the caller's choice, e.g. the PSNR/SSIM of
    :mod:`convfactor.measure.quality` with its conventions (8-bit, BT.601 Y and ``scale`` shaved for SR).
    """
    def prep(t):
        t = torch.as_tensor(t).detach().double().cpu()
        return (t[0] if t.dim() == 4 else t).clamp(0, data_range) / data_range

    def cut(t):
        if crop is None:
            return t
        y, x, h, w = crop
        return t[..., y:y + h, x:x + w]
    gt = prep(ground_truth)
    rows = [{"label": "ground truth", "array": cut(gt), "psnr": None}]
    for label, out in outputs.items():
        o = prep(out)
        if o.shape != gt.shape:
            raise ValueError(f"{label}: output shape {tuple(o.shape)} differs from the ground truth's "
                             f"{tuple(gt.shape)}")
        rows.append({"label": label, "array": cut(o), **metrics(o, gt)})
    return rows
