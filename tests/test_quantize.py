"""Static int8 through ONNX Runtime (issue 15): checked against ORT's float model, image-facing convs kept
in float32, the source file untouched, outputs never silently replaced."""
import hashlib

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from convfactor import models  # noqa: E402
from convfactor.data.images import builtin_images  # noqa: E402
from convfactor.data.sr import calibration_crops  # noqa: E402
from convfactor.export import OnnxModule, export_model  # noqa: E402
from convfactor.quantize import QuantConfig, image_conv_nodes, quantize_int8  # noqa: E402


@pytest.fixture(scope="module")
def edsr_onnx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    model = models.get("edsr_baseline_x2", pretrained=True)
    path = export_model(model, torch.rand(1, 3, 24, 24), tmp / "edsr.onnx", opset=17, dynamic_spatial=True, log=lambda m: None)
    crops = calibration_crops(builtin_images("train", limit=3), 2, side=24)
    return model, path, crops


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_dynamic_spatial_export_runs_at_other_sizes(edsr_onnx):
    model, path, _ = edsr_onnx
    session = OnnxModule(path, threads=1)
    for h, w in ((24, 24), (20, 36)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            assert torch.allclose(session(x), model(x), atol=1e-4)


def test_the_conv_that_writes_the_image_behind_a_merge_is_kept_in_float(tmp_path):
    """A merged low-rank EDSR's tail is a wide conv (r -> 12 sub-pixels) plus a bias field: no channel
    count flags it, the graph walk does (it reaches the output through PixelShuffle and adds only)."""
    import onnx

    from convfactor import compress
    model, x = models.get("edsr_baseline_x2", pretrained=True), torch.rand(1, 3, 24, 24)
    rules = [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.3, "exclude_op_names": ["head", "tail.1"]}]
    merged, report = compress(model, rules, x)
    assert report.merge.merged
    graph = onnx.load(str(export_model(merged.eval(), x, tmp_path / "m.onnx", opset=17, log=lambda m: None)))
    kept = image_conv_nodes(graph)
    assert "/head/Conv" in kept and "/tail/tail.0/tail.0.1/conv/Conv" in kept, kept
    assert not any(name.startswith("/body/") for name in kept)


def test_int8_model_tracks_ortfloat_and_keeps_image_convs_in_fp32(edsr_onnx, tmp_path):
    import onnx
    _, path, crops = edsr_onnx
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    report = quantize_int8(path, tmp_path / "int8.onnx", crops)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before          # the float file is untouched
    graph = onnx.load(str(path))
    assert report.kept_fp32 == image_conv_nodes(graph) and len(report.kept_fp32) == 2     # head and tail convs
    total_convs = sum(n.op_type == "Conv" for n in graph.graph.node)
    assert report.quantized_convs == total_convs - 2
    assert report.bytes_after < 0.5 * report.bytes_before                   # int8 weights
    quantized = onnx.load(report.path)
    kept = {n.name: n for n in quantized.graph.node if n.name in report.kept_fp32}
    deq = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert all(n.input[1] not in deq for n in kept.values())                # their weights stay float
    photo = calibration_crops(builtin_images("test", limit=1), 2, side=48)[0]     # a held-out photo, not calibrated on
    x = torch.from_numpy(photo)
    ref = OnnxModule(path, threads=1)(x).numpy()
    got = OnnxModule(report.path, threads=1)(x).numpy()
    assert 30.0 < _psnr(got, ref) < 200.0          # close to the float model, yet really quantized


def test_bad_inputs_write_nothing(edsr_onnx, tmp_path):
    _, path, crops = edsr_onnx
    out = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match="calibration"):
        QuantConfig(calibration="kl")
    with pytest.raises(ValueError, match="keep_fp32"):
        quantize_int8(path, out, crops, QuantConfig(keep_fp32=("no_such_node",)))
    with pytest.raises(ValueError, match="at least one input"):
        quantize_int8(path, out, [])
    with pytest.raises(FileNotFoundError):
        quantize_int8(tmp_path / "missing.onnx", out, crops)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        quantize_int8(path, out, crops)
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]


def test_calibration_crops_are_lr_crops_of_the_photos():
    crops = calibration_crops(builtin_images("train", limit=2), 2, side=16)
    assert len(crops) == 2 and all(c.shape == (1, 3, 16, 16) and c.dtype == np.float32 for c in crops)
    assert all(0.0 <= c.min() and c.max() <= 1.0 for c in crops)
