"""One answer to "which base model is this?": :func:`convfactor.io.base_model_of`, used by ``evaluate``,
``finetune``, ``report`` and ``commands.common.load_model`` alike."""
import argparse
import json

import pytest
from torch import nn

from convfactor import cli, io
from convfactor.commands.common import load_model


def _conv():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))


def test_a_recipe_with_its_base(tmp_path):
    io.save(_conv(), tmp_path / "m", metadata={"model": "dncnn", "input_shape": [1, 1, 16, 16]})
    assert io.base_model_of(tmp_path / "m") == "dncnn" == io.base_model_of(str(tmp_path / "m"))


def test_a_recipe_without_a_base(tmp_path):
    io.save(_conv(), tmp_path / "m")
    assert io.base_model_of(tmp_path / "m") is None
    io.save(_conv(), tmp_path / "m2", metadata={"input_shape": [1, 1, 16, 16]})
    assert io.base_model_of(tmp_path / "m2") is None


def test_a_missing_or_foreign_path(tmp_path):
    assert io.base_model_of(tmp_path / "missing") is None
    (tmp_path / "plain").mkdir()                              # a directory without recipe.json
    assert io.base_model_of(tmp_path / "plain") is None
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert io.base_model_of(tmp_path / "w.safetensors") is None
    assert io.base_model_of("no_such_model") is None


@pytest.mark.parametrize("name", ["resnet20", "edsr_baseline_x2", "torchvision:resnet18", "timm:resnet18",
                                  "convfactor.models.dncnn:dncnn"])
def test_a_model_name_is_its_own_base(name):
    assert io.base_model_of(name) == name


def _args(model, **kw):
    return argparse.Namespace(model=model, weights=None, pretrained=False, trust_pickle=False, input_size=None, **kw)


def test_load_model_reads_the_base_the_same_way(tmp_path):
    from convfactor.models import get
    io.save(get("dncnn"), tmp_path / "m", metadata={"model": "dncnn", "input_shape": [1, 1, 24, 24]})
    model, example = load_model(_args(str(tmp_path / "m")))
    assert tuple(example.shape) == (1, 1, 24, 24)
    io.save(get("dncnn"), tmp_path / "anon")
    with pytest.raises(ValueError, match="does not record its base model"):
        load_model(_args(str(tmp_path / "anon")))


def test_finetune_of_a_spec_records_it_so_the_output_reloads(tmp_path, capsys):
    """finetune's old fallback dropped a ``package.module:factory`` base, leaving a directory that
    ``load_model`` (and so evaluate, compress, export) refused; it is recorded now."""
    spec, out = "convfactor.models.dncnn:dncnn", tmp_path / "tuned"
    assert cli.main(["finetune", spec, "--task", "denoise", "--input-size", "1x1x16x16", "--steps", "1",
                     "--batch-size", "1", "--patch-size", "8", "--checkpoint-every", "1", "-o", str(out)]) == 0
    assert json.loads((out / "recipe.json").read_text())["metadata"]["model"] == spec
    assert io.base_model_of(out) == spec
    model, example = load_model(_args(str(out)))
    assert tuple(example.shape) == (1, 1, 16, 16)
