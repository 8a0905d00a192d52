"""OpenVINO as a deploy runtime: IR export (CLI and API), checked in OpenVINO itself; a module face
whose output agrees with PyTorch; bad outputs fail before anything is written."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from convfactor import openvino_runtime as ovr
from convfactor.cli import main


def _sr_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1),
                         nn.PixelShuffle(2)).eval()


def test_ir_export_runs_at_other_image_sizes(tmp_path):
    model = _sr_model()
    path = ovr.export_ir(model, torch.rand(1, 3, 16, 16), tmp_path / "m.xml")
    assert path.is_file() and path.with_suffix(".bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]          # no temporary left
    compiled = ovr.compile_model(path, threads=1)
    for size in [(16, 16), (20, 33)]:
        x = torch.rand(1, 3, *size)
        got = torch.from_numpy(compiled({0: x.numpy()})[compiled.output(0)].copy())
        with torch.no_grad():
            ref = model(x)
        assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 1e-5


def test_module_face_matches_pytorch_in_fp32_and_moves_a_little_in_bf16():
    model, x = _sr_model(), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    err32 = float((ovr.OpenVinoModule(model, x, threads=1)(x) - ref).norm() / ref.norm())
    assert err32 < 1e-5
    if ovr.precision_problem("bf16") is None:
        err16 = float((ovr.OpenVinoModule(model, x, threads=1, precision="bf16")(x) - ref).norm() / ref.norm())
        assert 1e-5 < err16 < 3e-2                 # really ran in bf16, and still close


def test_int8_keeps_the_image_facing_convs_in_float():
    model, x = _sr_model(), torch.rand(1, 3, 16, 16)
    ov_model = ovr.read_onnx(_onnx(model, x))
    names = ovr.image_facing_convs(ov_model)
    convs = [op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() == "Convolution"]
    assert len(names) == 2 and set(names) == set(convs)    # the 3->12 head, and the 12->12 that writes the
    quantized = ovr.quantize_nncf(ov_model, [torch.rand(1, 3, 16, 16).numpy() for _ in range(2)])  # sub-pixels
    assert not _quantized_convs(quantized) & set(names)


def _quantized_convs(ov_model) -> set[str]:
    return {op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() == "Convolution"
            and any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())}


def test_int8_finds_the_image_writing_conv_behind_a_merge():
    """The 19 dB int8 loss of a merged low-rank EDSR: its tail became a wide conv (r -> 12 sub-pixels)
    plus a bias field, which no channel count flags; the graph walk does, and int8 then stays close."""
    from convfactor import compress, models
    model, x = models.get("edsr_baseline_x2", pretrained=True), torch.rand(1, 3, 24, 24)
    rules = [{"op_types": ["Conv2d"], "method": "channel_svd", "macs_ratio": 0.3, "exclude_op_names": ["head", "tail.1"]}]
    merged, report = compress(model, rules, x)
    assert report.merge.merged                                  # the sub-pixel merge happened
    ov_model = ovr.read_onnx(_onnx(merged.eval(), x))
    names = ovr.image_facing_convs(ov_model)
    writer = [n for n in names if n.endswith("tail.0.1/conv/Conv/WithoutBiases")]
    assert writer, names
    calibration = [torch.rand(1, 3, 24, 24).numpy() for _ in range(3)]
    quantized = ovr.quantize_nncf(ov_model, calibration)
    assert _quantized_convs(quantized) and not _quantized_convs(quantized) & set(names)
    with torch.no_grad():
        ref = merged(x)
    out = torch.from_numpy(ovr.compile_model(quantized, threads=1)(x.numpy())[0])
    assert float((out - ref).norm() / ref.norm()) < 0.05


def _onnx(model, x):
    import tempfile
    from convfactor.export import export_model
    return export_model(model, x, tempfile.mkdtemp() + "/m.onnx", log=lambda _: None)


def test_cli_export_openvino_checks_the_ir_and_refuses_bad_outputs(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.5", "-o", str(out)]) == 0
    xml = tmp_path / "m.xml"
    assert main(["export", str(out), "--format", "openvino", "-o", str(xml)]) == 0
    text = capsys.readouterr().out
    assert "OpenVINO output vs PyTorch: relative error" in text and xml.with_suffix(".bin").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(["export", str(out), "--format", "openvino", "-o", str(xml)]) == 2          # exists
    assert main(["export", str(out), "--format", "openvino", "-o", str(tmp_path / "m.onnx")]) == 2
    (tmp_path / "n.bin").write_bytes(b"user's file")
    assert main(["export", str(out), "--format", "openvino", "-o", str(tmp_path / "n.xml")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "ends in .xml" in err
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "n.bin"}
    assert after == before and (tmp_path / "n.bin").read_bytes() == b"user's file"


@pytest.mark.parametrize("bad,words", [("tensorrt", "unknown timing back-end"),
                                       ("openvino:precision=fp8", "runs precision"),
                                       ("openvino:precison=bf16", "unknown option")])
def test_cli_backend_names_come_from_the_registry(tmp_path, capsys, bad, words):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "resnet20", "--target", "speedup=2x", "--backend", bad, "-o", str(tmp_path / "p.yaml")])
    assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
