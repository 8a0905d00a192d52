"""`convfactor finetune` on a compressed directory: data folder, distillation from the base model, checkpoints."""
import json

import numpy as np
import torch

from convfactor import cli, io, models


def _image_folder(path):
    from PIL import Image
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        base = np.linspace(0, 255, 40)[None, :, None] * np.ones((36, 1, 3))
        img = np.clip(base + rng.normal(0, 20, (36, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"im{i}.png")
    return path


def test_finetune_command_trains_and_saves_a_loadable_model(tmp_path, capsys):
    comp = tmp_path / "comp"
    assert cli.main(["compress", "edsr_baseline_x2", "--pretrained", "--method", "channel_svd", "--macs-ratio", "0.3",
                     "--op-names", "body.0.*", "--input-size", "1x3x16x16", "-o", str(comp)]) == 0
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "tuned"
    args = ["finetune", str(comp), "--data", str(data), "--steps", "4", "--batch-size", "2", "--patch-size", "8",
            "--lr", "1e-3", "--distill-from", "base", "--checkpoint-every", "2", "--threads", "1", "-o", str(out)]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "tuned.ckpt" / "latest.json").read_text())["step"] == 4
    base = models.get("edsr_baseline_x2")
    before, after = io.load(comp, base), io.load(out, base)
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert changed and all(k.startswith(("head", "body", "tail")) for k in changed)
    meta = json.loads((out / "recipe.json").read_text())["metadata"]
    assert meta["model"] == "edsr_baseline_x2" and meta["finetune"]["distill_from"] == "base"
    # a second call finds the finished checkpoint and does no further steps, with the same result
    out2 = tmp_path / "tuned2"
    assert cli.main(args[:-1] + [str(out2), "--checkpoint-dir", str(tmp_path / "tuned.ckpt")]) == 0
    again = io.load(out2, base)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.state_dict().items())


def test_finetune_command_errors_are_clear(tmp_path, capsys):
    assert cli.main(["finetune", "edsr_baseline_x2", "--data", str(tmp_path / "missing"), "--steps", "1",
                     "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["finetune", "edsr_baseline_x2", "--steps", "0", "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
