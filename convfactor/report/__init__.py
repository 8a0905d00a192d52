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

:func:`collect` builds such a dict from an original and a compressed model.
"""
from __future__ import annotations

import base64
import html
from io import BytesIO
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..compression.api import capture_layer_io
from ..compression.inspect import layer_facts
from ..files import atomic_write
from ..measure.compare import SpeedComparison, compare_speed
from ..measure.count import count
from ..measure.latency import environment
from ..methods.base import Factorized
from ..utils import as_inputs, plain_data
from . import figures

__all__ = ["write_report", "collect", "image_panel", "latency_rows", "float_psnr", "render_markdown", "render_html",
           "fmt", "FIGURES"]

#: figure name -> the data key it needs
FIGURES = {"layers": "layers", "spectra": "spectra", "latency": "latency", "crops": "images", "tradeoff": "tradeoff",
           "frontier": "frontier"}


def fmt(value: Any) -> str:
    """How a number appears in the Markdown / HTML tables (ints exact, floats 4 significant digits)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------- tables
def _layer_rows(data: dict) -> tuple[list[str], list[str], list[dict]]:
    fields = ["name", "method", "ranks", "params_before", "params_after", "macs_before", "macs_after",
              "weight_error", "output_error", "skipped"]
    heads = ["layer", "method", "ranks", "params before", "params after", "MACs before", "MACs after",
             "weight rel. error", "output rel. error", "skipped (reason)"]
    return heads, fields, data.get("layers") or []


def _tables(data: dict) -> list[tuple[str, str, list[str], list[str], list[dict]]]:
    """``(section id, title, column heads, row fields, rows)`` for every table present."""
    tables = []
    if data.get("totals"):
        t = dict(data["totals"])
        if t.get("params_before"):
            t["params_ratio"] = t["params_after"] / t["params_before"]
        if t.get("macs_before"):
            t["macs_ratio"] = t["macs_after"] / t["macs_before"]
        fields = [k for k in ("params_before", "params_after", "params_ratio", "macs_before", "macs_after",
                              "macs_ratio") if k in t]
        tables.append(("totals", "Totals (selected layers; MACs at input " + fmt(data.get("input_shape")) + ")",
                       [f.replace("_", " ").replace("macs", "MACs") for f in fields], fields, [t]))
    if data.get("layers"):
        heads, fields, rows = _layer_rows(data)
        tables.append(("layers", "Per-layer params and MACs", heads, fields, rows))
    if data.get("spectra"):
        thr = data.get("kappa_threshold")
        rows = [{"name": n, "kappa": s.get("kappa"), "rank": s.get("rank"), "full_rank": len(s.get("singular_values", [])),
                 "above_threshold": (s.get("kappa") > thr) if thr is not None and s.get("kappa") is not None else None}
                for n, s in data["spectra"].items()]
        tables.append(("spectra", f"Condition number per layer (threshold kappa = {fmt(thr)})",
                       ["layer", "kappa", "chosen rank", "full rank", "kappa > threshold"],
                       ["name", "kappa", "rank", "full_rank", "above_threshold"], rows))
    if data.get("latency"):
        rows = [dict(r, threads=(r.get("env") or {}).get("threads"), memory_format=(r.get("env") or {}).get("memory_format"))
                for r in data["latency"]]
        tables.append(("latency", "Measured latency", ["what", "median ms", "IQR ms", "threads", "memory format"],
                       ["label", "median_ms", "iqr_ms", "threads", "memory_format"], rows))
    if data.get("speed"):
        s = data["speed"]
        row = {k: s.get(k) for k in ("speedup", "original_best", "compressed_best", "macs_reduction", "efficiency")}
        tables.append(("speed", "Speed-up against the original's fastest form (same process)",
                       ["speed-up", "original fastest as", "compressed fastest as", "MAC reduction", "efficiency"],
                       list(row), [row]))
    if data.get("backends"):
        tables.append(("backends", "Speed-up per back-end, each against its own fastest dense form",
                       ["back-end", "original ms", "compressed ms", "speed-up", "95% interval", "efficiency",
                        "setup s", "noisy"],
                       ["backend", "original_ms", "compressed_ms", "speedup", "interval", "efficiency", "setup_s",
                        "noise"], data["backends"]))
    if data.get("images"):
        rows = [{k: im.get(k) for k in ("label", "psnr", "ssim")} for im in data["images"]]
        tables.append(("quality", "Image quality", ["image", "PSNR (dB)", "SSIM"], ["label", "psnr", "ssim"], rows))
    if data.get("tradeoff"):
        q = data.get("quality_name", "quality")
        tables.append(("tradeoff", f"Operating points: {q} vs MACs vs latency",
                       ["operating point", "MACs", "latency ms", q], ["label", "macs", "latency_ms", "quality"],
                       data["tradeoff"]))
    return tables


def _env_line(data: dict) -> str:
    env = data.get("env") or {}
    return ", ".join(f"{k}: {fmt(v)}" for k, v in env.items())


# ---------------------------------------------------------------------------------- figures
def render_figures(data: dict) -> dict[str, bytes]:
    """Figure name -> PNG bytes, for each figure whose data is present."""
    out = {}
    if data.get("layers"):
        rows = [L for L in data["layers"] if L.get("params_before") is not None]
        if rows:
            out["layers"] = figures.layer_bars(rows)
    if data.get("spectra"):
        out["spectra"] = figures.spectra(data["spectra"], data.get("kappa_threshold"))
    if data.get("latency"):
        out["latency"] = figures.latency_bars(data["latency"])
    if data.get("images"):
        out["crops"] = figures.crops(data["images"])
    if data.get("tradeoff"):
        out["tradeoff"] = figures.tradeoff(data["tradeoff"], data.get("quality_name", "quality"))
    if data.get("frontier"):
        f = data["frontier"]
        out["frontier"] = figures.frontier(f["points"], f.get("references", ()), loss_name=f.get("loss_name", "loss"))
    return out


_CAPTIONS = {"layers": "Per-layer parameters and MACs before and after (log scale).",
             "spectra": "Singular-value spectra and condition number per layer, with the threshold.",
             "latency": "Measured latency (median of repeats after warm-up; whiskers: IQR).",
             "crops": "Crops side by side with their PSNR against the ground truth.",
             "tradeoff": "Quality vs MACs vs latency across operating points.",
             "frontier": "Measured speed-up against quality loss, one line per back-end or approach; grey marks: "
                         "published points on other data (their x is not a measured speed-up)."}


# ---------------------------------------------------------------------------------- renderers
def render_markdown(data: dict, figure_files: dict[str, str] | None = None) -> str:
    lines = [f"# {data.get('title', 'convfactor report')}", ""]
    if data.get("model"):
        lines += [f"Model: `{data['model']}`", ""]
    if data.get("env"):
        lines += [f"Measured on: {_env_line(data)}", ""]
    lines += [f"> **Warning:** {w}" for w in data.get("warnings") or []] + ([""] if data.get("warnings") else [])
    lines += ["MACs are multiply-accumulates (FLOPs / 2) counted at the stated input size; they are not time.", ""]
    for sid, title, heads, fields, rows in _tables(data):
        lines += [f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(fmt(r.get(f)) for f in fields) + " |" for r in rows]
        lines.append("")
    for name, file in (figure_files or {}).items():
        lines += [f"![{_CAPTIONS[name]}]({file})", ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
          "td.num{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1.5em 0}img{max-width:100%}"
          "figcaption{color:#555;font-size:13px}.env{color:#555;font-size:12px}"
          ".warning{background:#fde8e8;border-left:4px solid #c00;padding:6px 10px}")


def render_html(data: dict, figures_png: dict[str, bytes]) -> str:
    """A single self-contained page: tables carry ``data-field`` on each cell, figures are data URIs."""
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(data.get('title', 'convfactor report'))}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{e(data.get('title', 'convfactor report'))}</h1>"]
    if data.get("model"):
        out.append(f"<p>Model: <code>{e(str(data['model']))}</code></p>")
    if data.get("env"):
        out.append(f"<p class='env'>Measured on: {e(_env_line(data))}</p>")
    out += [f"<p class='warning' data-warning='{i}'><strong>Warning:</strong> {e(w)}</p>"
            for i, w in enumerate(data.get("warnings") or [])]
    out.append("<p>MACs are multiply-accumulates (FLOPs / 2) counted at the stated input size; they are not time.</p>")
    for sid, title, heads, fields, rows in _tables(data):
        out.append(f"<section id='{sid}'><h2>{e(title)}</h2><table data-table='{sid}'><thead><tr>"
                   + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead><tbody>")
        for i, r in enumerate(rows):
            cells = []
            for f in fields:
                v = r.get(f)
                cls = " class='num'" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
                cells.append(f"<td data-field='{e(f)}'{cls}>{e(fmt(v))}</td>")
            out.append(f"<tr data-row='{i}'>" + "".join(cells) + "</tr>")
        out.append("</tbody></table></section>")
    for name, png in figures_png.items():
        b64 = base64.b64encode(png).decode("ascii")
        out.append(f"<figure id='fig-{name}'><img alt='{e(_CAPTIONS[name])}' src='data:image/png;base64,{b64}'>"
                   f"<figcaption>{e(_CAPTIONS[name])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


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


def collect(original, compressed, example_input, *, compression_report=None, measure: bool = False,
            threads: int | None = None, kappa_threshold: float | None = None, title: str | None = None,
            model_name: str | None = None, repeats: int = 10, max_layers: int = 8, spectra: bool = True) -> dict:
    """Report data for ``compressed`` (from ``original``): totals, per-layer costs, spectra of the
    original layers that were factorized (``spectra=True``; needs ``original``'s real weights), and
    with ``measure=True`` latency (whole models and the first ``max_layers`` factorized layers) and
    the speed-up."""
    inputs = as_inputs(example_input)
    data: dict[str, Any] = {"title": title or "convfactor report", "model": model_name,
                            "input_shape": list(inputs[0].shape),
                            "env": environment(threads, batch=int(inputs[0].shape[0]), dtype=str(inputs[0].dtype))}
    if compression_report is not None:
        d = compression_report if isinstance(compression_report, dict) else compression_report.to_dict()
        data["layers"], data["totals"] = d["layers"], d["totals"]
    else:
        data["layers"] = _counted_layers(original, compressed, inputs)
        keys = ("params_before", "params_after", "macs_before", "macs_after")
        data["totals"] = {k: sum(L[k] for L in data["layers"]) for k in keys}
    layer_spectra = _spectra(original, data["layers"]) if spectra else {}
    if layer_spectra:
        data["spectra"] = layer_spectra
        data["kappa_threshold"] = kappa_threshold
    if measure:
        data.update(_measured_speed(original, compressed, inputs, threads, repeats, max_layers))
    return data


def _counted_layers(original: nn.Module, compressed: nn.Module, inputs: tuple) -> list[dict]:
    """Per factorized layer of ``compressed``: method, ranks, params and MACs before and after, counted
    from the modules (when no CompressionReport is at hand)."""
    after = count(compressed, inputs)["layers"]
    before = count(original, inputs)["layers"]
    layers = []
    for name, m in compressed.named_modules():
        if isinstance(m, Factorized):
            macs_after = sum(v["macs"] for k, v in after.items() if k == name or k.startswith(name + "."))
            layers.append({"name": name, "method": m.method, "ranks": list(m.ranks),
                           "params_before": m.spec.dense_params(), "params_after": sum(p.numel() for p in m.parameters()),
                           "macs_before": before.get(name, {}).get("macs", 0), "macs_after": macs_after,
                           "weight_error": None, "output_error": None, "skipped": None})
    return layers


def _spectra(original: nn.Module, layers: list[dict]) -> dict[str, dict]:
    """Singular values, condition number and chosen rank of each listed layer of ``original``."""
    out = {}
    for L in layers:
        try:
            facts = layer_facts(L["name"], original.get_submodule(L["name"]))
        except Exception:  # noqa: BLE001 - a layer without a kernel matrix has no spectrum
            continue
        out[L["name"]] = {"singular_values": facts["singular_values"], "kappa": facts["kappa"],
                          "rank": (L.get("ranks") or [None])[0]}
    return out


def backend_rows(speeds: dict[str, SpeedComparison]) -> list[dict]:
    """One row per timing back-end: fastest forms' medians, the speed-up with its interval, efficiency,
    the compile/export seconds (not in the timings) and the noise reasons."""
    rows = []
    for name, s in speeds.items():
        rows.append({"backend": name, "original_ms": s.original[s.original_best]["median_ms"],
                     "compressed_ms": s.compressed[s.compressed_best]["median_ms"], "speedup": s.speedup,
                     "interval": f"{s.interval[0]:.2f}-{s.interval[1]:.2f}x" if s.interval else None,
                     "efficiency": s.efficiency, "setup_s": sum(s.setup_s.values()) or None,
                     "noise": "; ".join(s.noise) or "no"})
    return rows


def latency_rows(result: SpeedComparison) -> list[dict]:
    """One latency row per model and memory format of a speed comparison."""
    return [dict(label=f"{which} ({form})", median_ms=v["median_ms"], iqr_ms=v["iqr_ms"], env=v["env"])
            for which, forms in (("original", result.original), ("compressed", result.compressed))
            for form, v in forms.items() if isinstance(v, dict)]


@torch.no_grad()
def _measured_speed(original: nn.Module, compressed: nn.Module, inputs: tuple, threads: int | None, repeats: int,
                    max_layers: int) -> dict:
    """``{"speed", "latency"}``: both models end to end, then each of the first ``max_layers`` factorized
    layers against its original on the input it really sees (each in its fastest memory format)."""
    res = compare_speed(original, compressed, inputs, threads=threads, repeats=repeats)
    latency = latency_rows(res)
    names = [n for n, m in compressed.named_modules() if isinstance(m, Factorized)][:max_layers]
    io = capture_layer_io(original, names, inputs)
    for name in (n for n in names if n in io):
        r = compare_speed(original.get_submodule(name), compressed.get_submodule(name), io[name][0],
                          threads=threads, repeats=repeats)
        for which, best, forms in (("dense", r.original_best, r.original),
                                   ("factorized", r.compressed_best, r.compressed)):
            v = forms[best]
            latency.append(dict(label=f"{name} {which}", median_ms=v["median_ms"], iqr_ms=v["iqr_ms"], env=v["env"]))
    return {"speed": res.to_dict(), "latency": latency}


def float_psnr(a, b, data_range: float = 1.0) -> float:
    """PSNR in dB of the float image ``a`` against the reference ``b`` (same shape), as the values are:
    no 8-bit quantisation, no Y channel, no border shave (those are :func:`convfactor.measure.quality.psnr`'s)."""
    mse = torch.mean((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def image_panel(ground_truth, outputs: dict, crop: tuple[int, int, int, int] | None = None,
                data_range: float = 1.0, metrics: Callable[[torch.Tensor, torch.Tensor], dict] | None = None
                ) -> list[dict]:
    """``images`` entries for :func:`write_report`: the ground truth then each output, cropped to
    ``crop = (top, left, height, width)``; each output's figures are over the *whole* image.

    ``ground_truth`` and the outputs: ``(C, H, W)`` or ``(1, C, H, W)`` tensors in ``[0, data_range]``.
    ``metrics(output, ground_truth) -> {name: value}`` on the rescaled ``(C, H, W)`` float64 images in
    [0, 1] gives each output's figures (default: ``{"psnr": float_psnr(...)}``; e.g. the BT.601
    PSNR/SSIM of :mod:`convfactor.measure.quality`).
    """
    metrics = metrics or (lambda out, gt: {"psnr": float_psnr(out, gt, 1.0)})

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
