"""Rendering a report's data (see :mod:`convfactor.report` for its keys): the tables, the figures,
``report.md`` and the self-contained ``report.html``.  Pure functions of the data dict: nothing here
measures, and nothing writes files (:func:`convfactor.report.write_report` does)."""
from __future__ import annotations

import base64
import html
import math
from typing import Any

from . import figures

__all__ = ["fmt", "render_figures", "render_markdown", "render_html", "FIGURES"]

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


#: the tables in reading order: the answer's evidence (speed, quality) before the per-layer detail
TABLE_ORDER = ("speed", "backends", "quality", "tradeoff", "totals", "latency", "layers", "spectra")


def _tables(data: dict) -> list[tuple[str, str, list[str], list[str], list[dict]]]:
    """``(section id, title, column heads, row fields, rows)`` for every table present, in :data:`TABLE_ORDER`."""
    return sorted(_all_tables(data), key=lambda t: TABLE_ORDER.index(t[0]))


def _all_tables(data: dict) -> list[tuple[str, str, list[str], list[str], list[dict]]]:
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
        threshold = f"threshold kappa = {fmt(thr)}" if thr is not None else "no kappa threshold set"
        tables.append(("spectra", f"Condition number per layer ({threshold})",
                       ["layer", "kappa", "chosen rank", "full rank", "kappa > threshold"],
                       ["name", "kappa", "rank", "full_rank", "above_threshold"], rows))
    if data.get("latency"):
        threads = (data.get("env") or {}).get("threads")
        rows = [dict(r, threads=(r.get("env") or {}).get("threads", threads),
                     memory_format=(r.get("env") or {}).get("memory_format")) for r in data["latency"]]
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
    if data.get("answer"):
        lines += ["## The answer", "", *(f"- {line}" for line in data["answer"]), ""]
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
          ".warning{background:#fde8e8;border-left:4px solid #c00;padding:6px 10px}"
          ".answer{background:#eef5ff;border-left:4px solid #246;padding:2px 12px;font-size:16px}")


def render_html(data: dict, figures_png: dict[str, bytes]) -> str:
    """A single self-contained page: tables carry ``data-field`` on each cell, figures are data URIs."""
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(data.get('title', 'convfactor report'))}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{e(data.get('title', 'convfactor report'))}</h1>"]
    if data.get("answer"):
        out.append("<section id='answer' class='answer'><h2>The answer</h2><ul>"
                   + "".join(f"<li data-answer='{i}'>{e(line)}</li>" for i, line in enumerate(data["answer"]))
                   + "</ul></section>")
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
