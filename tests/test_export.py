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
