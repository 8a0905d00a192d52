"""Model specs: ``torchvision:NAME``, ``timm:NAME`` and ``package.module:factory`` build seeded random
models (nothing downloaded), the zoo is seeded too, and every bad spec or input size is one line.

torchvision/timm are imported through tests/thirdparty.py (the torch.library shim for machines whose
torchvision ops do not load); the library itself never uses the shim, which one test checks in a
fresh process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import thirdparty
from convfactor import models
from convfactor.cli import main
from convfactor.utils import UnknownName

REPO = Path(__file__).resolve().parents[2]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convfactor {command}: error: "), err
    return err[0]


# ------------------------------------------------------------------ seeding (the zoo and specs alike)
def test_zoo_models_get_the_same_weights_every_call_without_touching_the_global_generator():
    state = torch.random.get_rng_state()
    first, again = models.get("resnet20"), models.get("resnet20")
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_weights(first, again)
    assert not _same_weights(first, models.get("resnet20", seed=1))
    unseeded = models.get("resnet20", seed=None)                     # torch's global generator, which moves
    assert not _same_weights(unseeded, models.get("resnet20", seed=None))


def test_a_registered_factory_is_seeded_too():
    models.register("tiny_seeded_test", lambda: nn.Conv2d(3, 4, 3))
    assert _same_weights(models.get("tiny_seeded_test"), models.get("tiny_seeded_test"))


def test_plan_then_compress_sees_the_same_zoo_weights():
    """`plan resnet20` then `compress resnet20 --plan`: both build resnet20, so both must see one model."""
    from convfactor.commands.common import build_model
    (a, shape), (b, _) = build_model("resnet20"), build_model("resnet20")
    assert shape == (1, 3, 32, 32) and _same_weights(a, b)


# ------------------------------------------------------------------ torchvision / timm
def test_torchvision_spec_builds_a_seeded_random_model():
    tv = thirdparty.load("torchvision")
    model = models.get("torchvision:mobilenet_v3_small")
    assert isinstance(model, tv.models.MobileNetV3) and not model.training
    assert _same_weights(model, models.get("torchvision:mobilenet_v3_small"))
    assert not _same_weights(model, models.get("torchvision:mobilenet_v3_small", seed=3))
    tiny = models.get("torchvision:mobilenet_v3_small", num_classes=7)              # kwargs reach the builder
    assert tiny.classifier[-1].out_features == 7
    assert models.info("torchvision:resnet18") == {"name": "torchvision:resnet18", "input_shape": (3, 224, 224),
                                                   "task": "classification"}
    assert models.info("torchvision:r3d_18")["input_shape"] == (3, 16, 112, 112)
    assert models.info("torchvision:deeplabv3_mobilenet_v3_large")["task"] == "segmentation"


def test_segmentation_backbone_is_not_downloaded_either():
    thirdparty.load("torchvision")
    a = models.get("torchvision:deeplabv3_mobilenet_v3_large")          # weights_backbone=None: no network
    assert _same_weights(a, models.get("torchvision:deeplabv3_mobilenet_v3_large"))


def test_timm_spec_builds_a_seeded_random_model():
    thirdparty.load("timm")
    model = models.get("timm:convnext_atto")
    assert _same_weights(model, models.get("timm:convnext_atto"))
    assert models.info("timm:convnext_atto")["input_shape"] == (3, 224, 224)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:convnext_atto"])
def test_pretrained_third_party_weights_are_refused_not_downloaded(spec):
    thirdparty.load("timm")
    with pytest.raises(ValueError, match="never downloads"):
        models.get(spec, pretrained=True)


@pytest.mark.parametrize("spec, suggestion", [("torchvision:resnet81", "resnet18"),
                                              ("timm:convnext_atoo", "convnext_atto")])
def test_unknown_library_model_names_suggest_the_nearest(spec, suggestion):
    thirdparty.load("timm")
    with pytest.raises(UnknownName, match=f"unknown {spec.split(':')[0]} model .*did you mean {suggestion}"):
        models.get(spec)


def test_a_missing_library_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)                   # what `import timm` sees when absent
    with pytest.raises(ValueError, match=r"^timm is not installed \(pip install 'convfactor\[thirdparty\]'\)$"):
        models.get("timm:resnet18")


def test_the_library_imports_torchvision_plainly_without_the_test_shim():
    """In a fresh process (no shim): either torchvision imports (matching versions) and the model builds,
    or the error is one line naming the import failure.  The shim's op namespace is never defined."""
    code = ("import torch\nfrom convfactor import models\n"
            "try:\n    models.get('torchvision:resnet18'); print('built')\n"
            "except ValueError as e:\n    print('error:', e)\n"
            "print('nms defined' if hasattr(torch.ops.torchvision, 'nms') else 'nms undefined')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120).stdout.splitlines()
    assert len(out) == 2, out
    assert out == ["built", "nms defined"] or (out[0].startswith("error: torchvision could not be imported (")
                                               and out[1] == "nms undefined"), out


# ------------------------------------------------------------------ package.module:factory
@pytest.mark.parametrize("spec, message", [
    ("nosuchpkg:make", r"^cannot import nosuchpkg \(ModuleNotFoundError: No module named 'nosuchpkg'\)$"),
    ("os:no_such_factory", r"^os has no attribute 'no_such_factory'"),
    ("os:getcwd", r"^os:getcwd returned a str, not a torch.nn.Module$"),
    ("torch.nn:Conv2d", r"^torch.nn:Conv2d: building the model failed \(TypeError: "),
    ("nosep:", r"expected 'torchvision:NAME'"),
])
def test_bad_factory_specs_are_one_line_value_errors(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        models.get(spec)
    assert "\n" not in str(info.value)


def test_factory_spec_takes_keyword_arguments_and_is_seeded():
    a = models.get("torch.nn:Conv2d", in_channels=3, out_channels=4, kernel_size=3)
    assert isinstance(a, nn.Conv2d) and _same_weights(a, models.get("torch.nn:Conv2d", in_channels=3,
                                                                        out_channels=4, kernel_size=3))
    assert models.info("torch.nn:Conv2d") == {"name": "torch.nn:Conv2d", "input_shape": None, "task": "other"}


# ------------------------------------------------------------------ input sizes
def test_check_input_names_the_size_and_the_first_conv():
    model = models.get("resnet20")
    models.check_input(model, torch.randn(1, 3, 32, 32))             # fine: nothing raised
    with pytest.raises(ValueError, match=r"^the model does not run on an input of size 1x4x32x32; its first conv "
                                         r"conv1 takes 3 input channels, not 4 \(RuntimeError: ") as info:
        models.check_input(model, torch.randn(1, 4, 32, 32))
    assert "\n" not in str(info.value)


def test_check_input_leaves_the_callers_tensor_and_mode_alone():
    class InPlace(nn.Module):                                        # RCAN-style `x *= rgb_range`
        def forward(self, x):
            x *= 255.0
            return x
    model, x = InPlace().train(), torch.ones(1, 3, 4, 4)
    models.check_input(model, x)
    assert torch.equal(x, torch.ones(1, 3, 4, 4)) and model.training


@pytest.mark.parametrize("model_name", ["resnet20", "torchvision:resnet18"])
def test_cli_wrong_channel_count_is_one_line_and_writes_nothing(tmp_path, capsys, model_name):
    thirdparty.load("torchvision")
    (tmp_path / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    rc = main(["compress", model_name, "--input-size", "1x4x32x32", "--method", "channel_svd", "--rank", "2",
               "-o", str(tmp_path / "out")])
    assert rc == 2 and "1x4x32x32" in _one_line_error(capsys, "compress")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("model_name, message", [
    ("nosuchpkg:make", "cannot import nosuchpkg"),
    ("torchvision:resnet81", "unknown torchvision model 'resnet81'; did you mean resnet18"),
    ("timm:nosuchnet", "unknown timm model 'nosuchnet'"),
    ("torchvision.models.vision_transformer:VisionTransformer", "building the model failed (TypeError"),
])
def test_cli_bad_model_specs_are_one_line_and_exit_2(capsys, model_name, message):
    if model_name.startswith(("torchvision", "timm")):
        thirdparty.load("timm")
    assert main(["inspect", model_name, "--input-size", "1x3x32x32"]) == 2
    assert message in _one_line_error(capsys, "inspect")


def test_cli_third_party_model_needs_a_size_only_when_its_library_states_none(capsys):
    assert main(["inspect", "torch.nn:Identity"]) == 2
    assert "--input-size is needed for torch.nn:Identity" in _one_line_error(capsys, "inspect")


# ------------------------------------------------------------------ the user's workflow
def test_cli_torchvision_workflow_with_the_users_weights(tmp_path, capsys):
    """compress torchvision:NAME --weights FILE -> a directory that records the model and its input size,
    so export needs neither again; the user's weights (not the random init) are what got compressed."""
    thirdparty.load("torchvision")
    spec = "torchvision:squeezenet1_0"
    trained = models.get(spec, seed=7)                               # stands in for the user's trained model
    torch.save(trained.state_dict(), tmp_path / "mine.pt")
    out = tmp_path / "small"
    assert main(["compress", spec, "--weights", str(tmp_path / "mine.pt"), "--input-size", "1x3x48x48",
                 "--method", "channel_svd", "--macs-ratio", "0.5", "--op-names", "features.*", "-o", str(out)]) == 0
    import convfactor
    compressed = convfactor.load(out, models.get(spec))
    assert torch.equal(compressed.classifier[1].weight, trained.classifier[1].weight)    # not compressed: theirs
    assert main(["export", str(out), "-o", str(tmp_path / "small.onnx")]) == 0           # input size recorded
    assert (tmp_path / "small.onnx").stat().st_size > 0
    assert main(["inspect", str(out)]) == 0
