import os

import pytest
import torch
from torch import nn

import convfactor
from convfactor import models


def _compressed():
    model = models.get("edsr_baseline_x2").eval()
    x = torch.rand(1, 3, 16, 16)
    compressed, _ = convfactor.compress(model, [{"op_names": ["body.*"], "method": "channel_svd", "macs_ratio": 0.5}], x)
    return model, compressed, x


def test_round_trip_reproduces_outputs(tmp_path):
    model, compressed, x = _compressed()
    out = tmp_path / "m"
    convfactor.save(compressed, out)
    assert sorted(os.listdir(out)) == ["model.safetensors", "recipe.json"]
    loaded = convfactor.load(out, models.get("edsr_baseline_x2"))
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
    # overwrite in place is atomic and still loads
    convfactor.save(compressed, out)
    assert torch.equal(convfactor.load(out, model)(x), compressed(x))


def test_load_refuses_mismatched_base(tmp_path):
    _, compressed, _ = _compressed()
    convfactor.save(compressed, tmp_path / "m")
    with pytest.raises(ValueError):
        convfactor.load(tmp_path / "m", models.get("resnet20"))


def test_unwritable_path_fails_before_writing(tmp_path):
    _, compressed, _ = _compressed()
    with pytest.raises(OSError):
        convfactor.save(compressed, tmp_path / "missing" / "m")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("user data")
    with pytest.raises(FileExistsError):
        convfactor.save(compressed, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "user data"


def test_state_dict_loads_without_pickle_and_full_pickle_refused(tmp_path):
    model = models.get("resnet20")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = convfactor.load_weights(models.get("resnet20"), tmp_path / "sd.pt")
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="trust-pickle"):
        convfactor.load_weights(models.get("resnet20"), tmp_path / "full.pt")
    trusted = convfactor.load_weights(models.get("resnet20"), tmp_path / "full.pt", trust_pickle=True)
    assert torch.equal(trusted.fc.weight, model.fc.weight)


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    model = models.get("resnet20")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = convfactor.load_weights(models.get("resnet20"), tmp_path / "w.safetensors")
    assert torch.equal(fresh.conv1.weight, model.conv1.weight)


def test_recipes_written_before_methods_were_dataclasses_still_load(tmp_path):
    """Earlier recipes stored only what build() read ("form" for cp, nothing for tucker2, the resolved
    splits and impl for basis); the configured method is rebuilt from that subset."""
    import json
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 10, 10)
    rules = [{"op_names": ["0"], "method": "cp", "rank": 5, "form": "folded", "n_iter": 5},
             {"op_names": ["2"], "method": "tucker2", "rank": 3},
             {"op_names": ["4"], "method": "basis", "rank": 3, "impl": "grouped"}]
    compressed, _ = convfactor.compress(model, rules, x)
    convfactor.save(compressed, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["layers"]["0"]["options"]["n_iter"] == 5              # the recipe is the method's fields
    splits = recipe["layers"]["4"]["options"]["splits"]
    old = {"0": {"form": "folded"}, "2": {}, "4": {"splits": splits, "impl": "grouped"}}
    for name, options in old.items():
        recipe["layers"][name]["options"] = options
    (tmp_path / "m" / "recipe.json").write_text(json.dumps(recipe))
    loaded = convfactor.load(tmp_path / "m", model)
    assert loaded[0].options["form"] == "folded" and loaded[4].options["impl"] == "grouped"
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
