"""``spandrel:PATH``: a checkpoint spandrel recognizes is a model spec, weights included, in the API and the
CLI.  Its scale and input channels come from spandrel's descriptor; it is read with ``weights_only``
(a pickle that needs code is refused, never run); a compressed directory records the file's absolute path
and sha256, and refuses a file that is gone or changed.  Checkpoints are written here, in tmp_path, from
spandrel's own architecture classes with small sizes and seeded random weights: nothing is downloaded.

Also the stand-ins for torchvision's compiled ops (``convfactor.models.thirdparty.import_library``): on a
machine whose torchvision does not match torch, the library defines the ops' schemas (no kernels) and
says so in one line on stderr.
"""
import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import thirdparty
from convfactor import models
from convfactor.cli import main
from convfactor.models.thirdparty import torchvision_ops_missing

REPO = Path(__file__).resolve().parents[2]
NOTE = "note: torchvision's compiled ops are unavailable"


@pytest.fixture(scope="module")
def spandrel():
    return thirdparty.load("spandrel")


def _seeded(build, seed: int = 1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _compact(channels: int = 3, scale: int = 2, seed: int = 1):
    from spandrel.architectures.Compact import Compact
    return _seeded(lambda: Compact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=2, upscale=scale),
                   seed)


def _esrgan(channels: int = 1, scale: int = 4):
    from spandrel.architectures.ESRGAN import ESRGAN
    return _seeded(lambda: ESRGAN(in_nc=channels, out_nc=channels, num_filters=8, num_blocks=1, scale=scale))


def _write_safetensors(model, file: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return file


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(NOTE)]
    assert len(err) == 1 and err[0].startswith(f"convfactor {command}: error: "), err
    return err[0]


def _same_state(model, reference) -> bool:
    a, b = model.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RunsCode:
    """A pickled object whose loading would touch ``marker``: what a weights-only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# ------------------------------------------------------------------ the API
def test_api_loads_safetensors_and_pth_with_their_scale_and_channels(spandrel, tmp_path):
    colour = _compact(channels=3, scale=2)
    grey = _esrgan(channels=1, scale=4)
    st = _write_safetensors(colour, tmp_path / "2x_compact.safetensors")
    torch.save(grey.state_dict(), tmp_path / "4x_esrgan.pth")
    torch.save({"params_ema": grey.state_dict()}, tmp_path / "4x_basicsr.pth")      # BasicSR's wrapping
    a = models.get(f"spandrel:{st}")
    assert _same_state(a, colour) and not a.training
    assert models.info(f"spandrel:{st}") == {"name": f"spandrel:{st}", "input_shape": (3, 64, 64), "task": "sr",
                                             "scale": 2, "architecture": "RealESRGAN Compact"}
    for name in ("4x_esrgan.pth", "4x_basicsr.pth"):
        spec = f"spandrel:{tmp_path / name}"
        b = models.get(spec, pretrained=True)                        # the file's weights: pretrained is a no-op
        assert _same_state(b, grey)
        info = models.info(spec)
        assert (info["input_shape"], info["task"], info["scale"]) == ((1, 64, 64), "sr", 4)
        with torch.no_grad():
            assert b(torch.rand(1, 1, 8, 8)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="takes no keyword arguments"):
        models.get(f"spandrel:{st}", upscale=3)


def test_a_saved_model_records_its_spandrel_base_by_absolute_path_and_sha256(spandrel, tmp_path, monkeypatch):
    import convfactor
    from convfactor import io
    st = _write_safetensors(_compact(), tmp_path / "2x.safetensors")
    monkeypatch.chdir(tmp_path)
    convfactor.save(models.get("spandrel:2x.safetensors"), tmp_path / "saved",
                    metadata={"model": "spandrel:2x.safetensors"})
    digest = hashlib.sha256(st.read_bytes()).hexdigest()
    assert io.base_model_of(tmp_path / "saved") == f"spandrel:{st.resolve()}#sha256={digest}"


# ------------------------------------------------------------------ the CLI workflow
@pytest.mark.slow
def test_cli_compress_in_a_fresh_process_then_export_and_evaluate_the_directory(spandrel, tmp_path, capsys):
    """A fresh process (no test shim) compresses a relative spandrel:PATH; the directory records the
    absolute path and hash, and export / evaluate rebuild the base from them (evaluate at the file's scale)."""
    ckpt = _write_safetensors(_compact(scale=2), tmp_path / "2x_compact.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "convfactor.cli", "compress", "spandrel:2x_compact.safetensors",
                          "--input-size", "1x3x16x16", "--method", "channel_svd", "--macs-ratio", "0.5", "-o", "out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "error" not in run.stderr.lower(), run.stderr
    meta = json.loads((tmp_path / "out" / "recipe.json").read_text())["metadata"]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta == {"model": f"spandrel:{ckpt.resolve()}#sha256={digest}", "input_shape": [1, 3, 16, 16]}
    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "out.onnx")]) == 0
    assert (tmp_path / "out.onnx").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "out"), "--max-side", "32", "--limit", "1", "--no-baseline", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["task"], result["scale"]) == ("sr", 2)


def test_cli_finetune_of_a_compressed_spandrel_directory(spandrel, tmp_path, capsys):
    ckpt = _write_safetensors(_compact(scale=2), tmp_path / "2x_compact.safetensors")
    out = tmp_path / "out"
    assert main(["compress", f"spandrel:{ckpt}", "--input-size", "1x3x16x16", "--method", "channel_svd",
                 "--macs-ratio", "0.5", "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["finetune", str(out), "--steps", "1", "--batch-size", "2", "--patch-size", "16",
               "-o", str(tmp_path / "tuned")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "tuned" / "recipe.json").read_text())["metadata"]["model"].startswith(
        f"spandrel:{ckpt.resolve()}#sha256=")


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written
def test_a_pickle_that_runs_code_is_refused_and_never_run(spandrel, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({**_compact().state_dict(), "extra": RunsCode(marker)}, tmp_path / "evil.pth")
    before = _tree(tmp_path)
    rc = main(["compress", f"spandrel:{tmp_path / 'evil.pth'}", "--method", "channel_svd", "--macs-ratio", "0.5",
               "-o", str(tmp_path / "out")])
    assert rc == 2
    line = _one_line_error(capsys, "compress")
    assert "evil.pth is not a plain state dict" in line and "refused" in line
    assert not marker.exists() and _tree(tmp_path) == before


@pytest.mark.parametrize("case, message", [
    ("foreign", "spandrel 0.4.2 does not recognize the architecture in"),
    ("missing", "spandrel checkpoint"),
    ("directory", "is a directory; give a checkpoint file"),
    ("text", "is not a PyTorch checkpoint"),
    ("truncated", "is not a valid safetensors file"),
])
def test_bad_checkpoints_are_one_line_and_exit_2(spandrel, tmp_path, capsys, case, message):
    (tmp_path / "dir").mkdir()
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "foreign.safetensors").read_bytes()[:20])
    path = {"foreign": "foreign.safetensors", "missing": "nope.pth", "directory": "dir", "text": "notes.pth",
            "truncated": "cut.safetensors"}[case]
    if case == "foreign":
        message = message.replace("0.4.2", spandrel.__version__)
    before = _tree(tmp_path)
    assert main(["compress", f"spandrel:{tmp_path / path}", "--method", "channel_svd", "--macs-ratio", "0.5",
                 "-o", str(tmp_path / "out")]) == 2
    assert message in _one_line_error(capsys, "compress")
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_changed_or_missing_base_file_is_refused_by_the_compressed_directory(spandrel, tmp_path, capsys):
    ckpt = _write_safetensors(_compact(), tmp_path / "2x.safetensors")
    original = ckpt.read_bytes()
    out, onnx = tmp_path / "out", tmp_path / "out.onnx"
    assert main(["compress", f"spandrel:{ckpt}", "--input-size", "1x3x16x16", "--method", "channel_svd",
                 "--macs-ratio", "0.5", "-o", str(out)]) == 0
    capsys.readouterr()
    _write_safetensors(_compact(), ckpt)                             # the same weights: same bytes, accepted
    assert ckpt.read_bytes() == original
    _write_safetensors(_compact(seed=2), ckpt)                       # retrained in place
    assert main(["export", str(out), "-o", str(onnx)]) == 2
    assert "2x.safetensors has changed since a model was compressed from it" in _one_line_error(capsys, "export")
    ckpt.unlink()
    assert main(["export", str(out), "-o", str(onnx)]) == 2
    assert "2x.safetensors is gone" in _one_line_error(capsys, "export")
    assert not onnx.exists()
    ckpt.write_bytes(original)                                       # put back: works again
    assert main(["export", str(out), "-o", str(onnx)]) == 0


# ------------------------------------------------------------------ torchvision's compiled ops
def test_only_the_missing_torchvision_ops_failure_is_recognised():
    assert torchvision_ops_missing(RuntimeError("operator torchvision::nms does not exist"))
    assert not torchvision_ops_missing(RuntimeError("operator torchvision::nms expected 3 arguments"))
    assert not torchvision_ops_missing(ValueError("operator torchvision::nms does not exist"))
    assert not torchvision_ops_missing(ImportError("No module named 'torchvision'"))


def test_the_library_imports_torchvision_with_stand_ins_whose_ops_still_fail(tmp_path):
    """In a fresh process: torchvision imports through the library, either for real (the op runs, no note)
    or with the schema stand-ins (one note on stderr, however often it is imported; calling nms fails)."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install 'convfactor[thirdparty]')")
    code = ("import torch\nfrom convfactor.models.thirdparty import import_library\n"
            "import_library('torchvision'); import_library('torchvision')\n"
            "try:\n    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); print('nms ran')\n"
            "except (NotImplementedError, RuntimeError) as e:\n    print('nms failed')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if line.startswith(NOTE)]
    assert (run.stdout.split(), len(notes)) in ((["nms", "ran"], 0), (["nms", "failed"], 1)), (run.stdout, run.stderr)
