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
