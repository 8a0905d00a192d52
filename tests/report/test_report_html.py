"""A report renders from a small run: HTML exists, embeds its figures, and its numbers equal the JSON's."""
import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

from convfactor.compression.api import compress
from convfactor.measure.report_data import collect
from convfactor.report import fmt, write_report


class _Page(HTMLParser):
    """Collects <img src>, table cells (table id, row, field, text) and whether any external resource is linked."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.external = [], [], []
        self._table = self._row = self._field = None
        self._text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)
        if tag == "table":
            self._table = a.get("data-table")
        if tag == "tr":
            self._row = a.get("data-row")
        if tag == "td":
            self._field, self._text = a.get("data-field"), []

    def handle_data(self, data):
        if self._field is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._field is not None:
            self.cells.append((self._table, int(self._row), self._field, "".join(self._text)))
            self._field = None


def _small_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    compressed, rep = compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.5}], x)
    return model, compressed, rep, x


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    model, compressed, rep, x = _small_run()
    data = collect(model, compressed, x, compression_report=rep, kappa_threshold=10.0, model_name="tiny")
    gt = np.linspace(0, 1, 12 * 12 * 3).reshape(12, 12, 3)
    data["images"] = [{"label": "ground truth", "array": gt, "psnr": None},
                      {"label": "channel_svd", "array": torch.from_numpy(gt).permute(2, 0, 1) * 0.9, "psnr": 27.5}]
    data["latency"] = [{"label": "original", "median_ms": 1.25, "iqr_ms": 0.1, "env": {"threads": 1}},
                       {"label": "channel_svd", "median_ms": 0.75, "iqr_ms": 0.05, "env": {"threads": 1}}]
    data["tradeoff"] = [{"label": "channel_svd @0.5", "group": "channel_svd", "macs": 1000, "latency_ms": 0.75,
                         "quality": 27.5},
                        {"label": "channel_svd @0.25", "group": "channel_svd", "macs": 500, "latency_ms": None,
                         "quality": 25.0}]
    data["quality_name"] = "PSNR (dB)"
    data["frontier"] = {"points": [{"group": "torch", "speedup": 1.0, "loss": 0.0},
                                   {"group": "torch", "speedup": 2.5, "loss": 0.1, "interval": [2.4, 2.6], "label": "a"}],
                        "references": [{"label": "paper, params ratio", "x": 4.0, "loss": 0.09},
                                       {"label": "paper, no speed", "x": None, "loss": 0.3}], "loss_name": "PSNR loss"}
    out = tmp_path_factory.mktemp("run")
    write_report(out, data)
    return out


def test_files_and_embedded_figures(report_dir):
    page = _Page()
    page.feed((report_dir / "report.html").read_text())
    assert not page.external                                           # self-contained
    assert len(page.images) == 6                     # layers, spectra, latency, crops, trade-off, frontier
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert (report_dir / "report.md").read_text().count("![") == 6
    assert (report_dir / "crops" / "01.png").is_file()


def test_html_numbers_equal_json(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    page = _Page()
    page.feed((report_dir / "report.html").read_text())
    cells = {(t, r, f): text for t, r, f, text in page.cells}
    n = 0
    for i, layer in enumerate(data["layers"]):
        assert cells[("layers", i, "name")] == layer["name"]
        for f in ("params_before", "params_after", "macs_before", "macs_after"):
            assert int(cells[("layers", i, f)]) == layer[f]                  # exact integers
            n += 1
        assert float(cells[("layers", i, "output_error")]) == pytest.approx(layer["output_error"], rel=1e-3)
    t = data["totals"]
    assert int(cells[("totals", 0, "macs_after")]) == t["macs_after"] == sum(L["macs_after"] for L in data["layers"])
    assert float(cells[("totals", 0, "macs_ratio")]) == pytest.approx(t["macs_after"] / t["macs_before"], rel=1e-3)
    for i, (name, s) in enumerate(data["spectra"].items()):
        assert cells[("spectra", i, "name")] == name
        assert float(cells[("spectra", i, "kappa")]) == pytest.approx(s["kappa"], rel=1e-3)
        assert cells[("spectra", i, "above_threshold")] == str(s["kappa"] > 10.0)
    assert float(cells[("quality", 1, "psnr")]) == 27.5 and cells[("quality", 0, "psnr")] == "-"
    assert float(cells[("latency", 0, "median_ms")]) == 1.25
    assert n == 4 * len(data["layers"]) and len(data["layers"]) == 3
    assert "array" not in json.dumps(data["images"])                    # pixels live in crops/, not the JSON


def test_fmt():
    assert fmt(123456789) == "123456789" and fmt(0.123456) == "0.1235" and fmt(None) == "-"
    assert fmt(float("inf")) == "inf" and fmt([1, 2]) == "1,2"


def test_report_command_on_compress_output(tmp_path, capsys):
    from convfactor.cli import main
    from safetensors.torch import save_file

    from convfactor.compression.inspect import layer_facts
    from convfactor.models import get
    torch.manual_seed(3)
    original = get("resnet20")
    save_file(original.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "run"
    assert main(["compress", "resnet20", "--weights", str(tmp_path / "w.safetensors"), "--method", "channel_svd",
                 "--macs-ratio", "0.5", "--op-names", "layer1.0.*", "-o", str(out)]) == 0
    # compress had the trained kernels in hand, so its report already holds their spectra
    compressed_spectra = json.loads((out / "report.json").read_text())["spectra"]
    assert main(["report", str(out)]) == 0           # re-rendering without weights keeps them
    assert json.loads((out / "report.json").read_text())["spectra"] == compressed_spectra
    for name, s in compressed_spectra.items():
        assert s["kappa"] == pytest.approx(layer_facts(name, original.get_submodule(name))["kappa"])
    data = json.loads((out / "report.json").read_text())
    del data["spectra"]
    (out / "report.json").write_text(json.dumps(data))
    assert main(["report", str(out)]) == 0
    assert "no singular spectra" in capsys.readouterr().out
    assert "spectra" not in json.loads((out / "report.json").read_text())
    assert main(["report", str(out), "--weights", str(tmp_path / "w.safetensors"), "--kappa-threshold", "50"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert set(data["spectra"]) == {L["name"] for L in data["layers"]} and data["kappa_threshold"] == 50
    for name, s in data["spectra"].items():        # the original's kernels, not a fresh initialization
        assert s["kappa"] == pytest.approx(layer_facts(name, original.get_submodule(name))["kappa"])
    assert (out / "report.html").stat().st_size > 10_000
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="headless Chromium is not installed")
def test_report_opens_in_headless_chromium(report_dir, tmp_path):
    """The page opens in a real browser, every figure decodes (naturalWidth > 0), and it renders non-blank."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    probe = tmp_path / "probe.html"        # the report plus a script that records how many images decoded
    probe.write_text((report_dir / "report.html").read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute('data-decoded', "
                   "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length));</script></body>"))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    assert 'data-decoded="6"' in dom                    # the six figures, frontier included
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000", (report_dir / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    from matplotlib.image import imread
    img = imread(str(shot))
    assert img.shape[0] >= 1000 and img[..., :3].std() > 0.05         # the page rendered, not blank


def test_image_panel_psnr_and_crop():
    """The panel crops, and each output's figure is the injected metric's over the whole image, rescaled
    from ``data_range`` to [0, 1] first; the panel has no metric of its own."""
    from convfactor.measure import quality
    from convfactor.report import image_panel
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 20, 24, generator=g)
    noisy = (gt + 0.1 * torch.randn(3, 20, 24, generator=g)).clamp(0, 1)
    metric = lambda out, target: {"psnr": quality.psnr(out, target, y_channel=False)}  # noqa: E731
    rows = image_panel(gt, {"noisy": noisy.unsqueeze(0), "same": gt}, crop=(2, 3, 8, 10), metrics=metric)
    assert [r["label"] for r in rows] == ["ground truth", "noisy", "same"]
    assert rows[0]["array"].shape == (3, 8, 10) and rows[0]["psnr"] is None
    assert rows[1]["psnr"] == pytest.approx(quality.psnr(noisy, gt, y_channel=False))
    assert rows[2]["psnr"] == float("inf")
    scaled = image_panel(gt * 255, {"noisy": noisy * 255}, data_range=255.0, metrics=metric)
    assert scaled[1]["psnr"] == pytest.approx(rows[1]["psnr"])
    with pytest.raises(TypeError):
        image_panel(gt, {"noisy": noisy})                # the caller chooses the metric


def test_image_panel_takes_the_quality_metrics():
    """With quality's metrics, each output's figures are measure.quality's PSNR-Y/SSIM-Y (8-bit, shaved)."""
    from convfactor.measure import quality
    from convfactor.report import image_panel
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(3, 24, 24, generator=g)
    out = (gt + 0.05 * torch.randn(3, 24, 24, generator=g)).clamp(0, 1)
    rows = image_panel(gt, {"out": out}, crop=(0, 0, 8, 8),
                       metrics=lambda o, t: {"psnr": quality.psnr(o, t, scale=2), "ssim": quality.ssim(o, t, scale=2)})
    assert rows[1]["psnr"] == pytest.approx(quality.psnr(out, gt, scale=2))
    assert rows[1]["ssim"] == pytest.approx(quality.ssim(out, gt, scale=2))
    assert rows[1]["array"].shape == (3, 8, 8)


def test_collect_measures_layers(tmp_path):
    model, compressed, rep, x = _small_run()
    data = collect(model, compressed, x, measure=True, threads=1, repeats=2, max_layers=2)
    labels = [r["label"] for r in data["latency"]]
    assert "original (contiguous)" in labels and "compressed (channels_last)" in labels
    assert "0 dense" in labels and "0 factorized" in labels and "4 dense" not in labels
    assert data["speed"]["speedup"] > 0 and data["totals"]["macs_after"] < data["totals"]["macs_before"]
    # without a CompressionReport the per-layer costs are counted from the modules
    assert [L["macs_after"] for L in data["layers"]] == [L.macs_after for L in rep.layers]
    assert [L["params_after"] for L in data["layers"]] == [L.params_after for L in rep.layers]
