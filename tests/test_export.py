"""Export: the ONNX file runs in onnxruntime, matches PyTorch, and shrinks with the factorization."""

import pytest
import torch

from convfactor.cli import main
from convfactor.export import check_onnx, export_model
from convfactor.compression.api import compress
from convfactor.measure.count import count_params
from convfactor.models import get


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = get("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    compressed, _ = compress(model, [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.3}], x)
    return model, compressed.eval(), x


def test_onnx_matches_and_shrinks(models, tmp_path):
    model, compressed, x = models
    a = export_model(model, x, tmp_path / "orig.onnx")
    b = export_model(compressed, x, tmp_path / "comp.onnx")
    ra, rb = check_onnx(a, model, x), check_onnx(b, compressed, x)
    assert ra["rel_error"] < 1e-5 and rb["rel_error"] < 1e-5
    # the file carries the factorized weights: its stored weights shrink like the parameter count
    assert rb["params_in_file"] < 0.6 * ra["params_in_file"]
    assert abs(rb["params_in_file"] - count_params(compressed)) <= 0.02 * count_params(compressed)
    assert b.stat().st_size < 0.6 * a.stat().st_size
    # the batch axis is dynamic
    assert check_onnx(b, compressed, torch.randn(3, 3, 32, 32))["output_shape"][0] == 3


def test_cli_export_onnx_and_torchscript(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.5", "-o", str(out)]) == 0
    assert main(["export", str(out), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    assert "relative error" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    from convfactor import io
    ref = io.load(out, get("resnet20")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref(x), atol=1e-5)
    assert main(["export", str(out), "-o", str(tmp_path / "missing" / "m.onnx")]) == 2
    assert not list(tmp_path.glob(".m.onnx*"))                       # no temporary left behind


# ------------------------------------------------------------------ issue 14: export what compress produces
class _TwoHeads(torch.nn.Module):
    """Returns an OrderedDict of two tensors, like torchvision's segmentation models ({'out', 'aux'})."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out, self.aux = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        from collections import OrderedDict
        h = torch.relu(self.body(x))
        return OrderedDict(out=self.out(h), aux=self.aux(h).mean((2, 3)))


def test_dict_outputs_are_exported_and_every_tensor_checked(tmp_path):
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(1, 3, 12, 12)
    compressed, _ = compress(model, [{"op_names": ["body"], "method": "channel_svd", "rank": 3}], x)
    res = check_onnx(export_model(compressed, x, tmp_path / "m.onnx"), compressed, x)
    assert res["outputs"] == 2 and len(res["rel_errors"]) == 2 and res["rel_error"] < 1e-5
    with torch.no_grad():                       # a wrong second tensor is caught, not only the first one
        compressed.aux.bias.add_(1.0)
    assert check_onnx(tmp_path / "m.onnx", compressed, x)["rel_errors"][1] > 1e-2


@pytest.mark.parametrize("opset", [17, 18])
def test_the_requested_opset_is_written(models, tmp_path, opset):
    from convfactor.export import onnx_opset
    _, compressed, x = models
    notes = []
    path = export_model(compressed, x, tmp_path / "m.onnx", opset=opset, log=notes.append)
    assert onnx_opset(path) == opset and f"opset {opset}" in notes[0]
    import onnx
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [opset]


def test_a_failing_exporter_falls_back_with_one_line(models, tmp_path, monkeypatch):
    """torch.export fails on ConvNeXt/SwinIR ('Invalid ranges [2:1]'): the TorchScript exporter writes
    the file, and one line says so and why."""
    from convfactor import export
    _, compressed, x = models
    real = export._run_exporter

    def dynamo_fails(exporter, *args):
        if exporter == "dynamo":
            raise RuntimeError("Invalid ranges [2:1]\nlong traceback")
        return real(exporter, *args)
    monkeypatch.setattr(export, "_unavailable", lambda exporter, opset: None)       # as if onnxscript were here
    monkeypatch.setattr(export, "_run_exporter", dynamo_fails)
    notes = []
    path = export_model(compressed, x, tmp_path / "m.onnx", log=notes.append)
    assert notes == ["ONNX opset 18 written by the TorchScript exporter (dynamo: failed: Invalid ranges [2:1])"]
    assert check_onnx(path, compressed, x)["rel_error"] < 1e-5
    with pytest.warns(UserWarning, match="TorchScript exporter"):                   # without a log: a warning
        export_model(compressed, x, tmp_path / "m2.onnx")


def test_cli_opset_is_honoured_or_fails_cleanly(tmp_path, capsys):
    from convfactor.export import onnx_opset
    out = tmp_path / "run"
    assert main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.5", "--op-names", "layer1.*",
                 "-o", str(out)]) == 0
    assert main(["export", str(out), "--opset", "17", "-o", str(tmp_path / "m.onnx")]) == 0
    assert onnx_opset(tmp_path / "m.onnx") == 17 and "opset 17 written by" in capsys.readouterr().out
    assert main(["export", str(out), "--opset", "99", "-o", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX export at opset 99 failed" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]          # nothing left behind


def test_cli_export_and_inspect_of_a_factory_directory_use_the_recorded_input_size(tmp_path, capsys):
    out = tmp_path / "run"
    spec = "convfactor.models.resnet_cifar:resnet20"
    assert main(["compress", spec, "--input-size", "1x3x24x24", "--method", "channel_svd", "--macs-ratio", "0.5",
                 "--op-names", "layer1.0.*", "-o", str(out)]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "input: 1x3x24x24" in capsys.readouterr().out


def test_torchvision_convnext_exports_after_compression(tmp_path):
    """The issue's case: ConvNeXt (LayerNorm2d, token Linears, layer scale) after channel/linear SVD."""
    thirdparty = pytest.importorskip("thirdparty")
    torchvision = thirdparty.load("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    compressed, report = compress(model, [{"op_types": ["Conv2d", "Linear"], "op_names": ["features.1.0.*"],
                                           "method": "channel_svd", "macs_ratio": 0.5},
                                          {"op_types": ["Linear"], "op_names": ["features.1.0.*"],
                                           "method": "linear_svd", "macs_ratio": 0.5}], x)
    assert report.compressed
    notes = []
    path = export_model(compressed, x, tmp_path / "m.onnx", log=notes.append)
    assert check_onnx(path, compressed, x)["rel_error"] < 1e-5 and "written by" in notes[0]


# ------------------------------------------------------------------ issue 23: height and width dynamic by default
def test_cli_onnx_takes_any_image_size_unless_static_shape(tmp_path, capsys):
    """An SR model exported by default runs in onnxruntime at two image sizes and matches PyTorch at
    both; with --static-shape the file is fixed at the example's size and refuses another."""
    import onnxruntime as ort
    from convfactor import io
    run, dynamic, static = tmp_path / "sr", tmp_path / "sr.onnx", tmp_path / "sr_static.onnx"
    assert main(["compress", "edsr_baseline_x2", "--input-size", "1x3x16x16", "--method", "channel_svd",
                 "--rank", "8", "--op-names", "tail.0.0", "-o", str(run)]) == 0
    common = ["export", str(run)]
    assert main([*common, "-o", str(dynamic)]) == 0
    assert "height and width dynamic" in capsys.readouterr().out
    model = io.load(run, get("edsr_baseline_x2")).eval()          # the weights the file was exported from
    session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])
    for size in ((16, 16), (20, 28)):
        x = torch.randn(1, 3, *size)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == ref.shape == (1, 3, 2 * size[0], 2 * size[1])
        assert abs(got - ref).max() <= 1e-4 * max(1.0, abs(ref).max())
    assert main([*common, "--static-shape", "-o", str(static)]) == 0
    assert "fixed at 16x16" in capsys.readouterr().out
    fixed = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        fixed.run(None, {"input": torch.randn(1, 3, 20, 28).numpy()})
