"""Issue 14's bad inputs through the CLI: each is one error line and exit 2, with the directory tree
(every file's bytes) exactly as it was before; outputs are never replaced without --overwrite, and
then only convfactor's own files are."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convfactor import models
from convfactor.cli import main


def snapshot(root) -> dict:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def fails_cleanly(capsys, root, argv: list[str], *needles: str) -> str:
    """Run the CLI: exit 2, one stderr line 'convfactor CMD: error: ...' holding every needle, and the
    tree under ``root`` unchanged; returns the line.  A model without shipped weights may say so first,
    in one 'note:' line."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("note: ") or "no shipped weights" not in line]
    assert len(err) == 1 and len(lines) - len(err) <= 1, lines
    assert err[0].startswith(f"convfactor {argv[0]}: error: "), err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    assert snapshot(root) == before
    return err[0]


COMPRESS = ["--method", "channel_svd", "--macs-ratio", "0.5", "--op-names", "layer1.0.*"]


@pytest.fixture()
def resnet20_weights(tmp_path):
    torch.manual_seed(0)
    state = models.get("resnet20").state_dict()
    return state


# ------------------------------------------------------------------ weights files
def test_random_bytes_safetensors(tmp_path, capsys):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--weights", str(bad), *COMPRESS,
                                     "-o", str(tmp_path / "out")], f"{bad} is not a valid safetensors file")


def test_truncated_safetensors(tmp_path, capsys, resnet20_weights):
    good = tmp_path / "full.safetensors"
    save_file(resnet20_weights, str(good))
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails_cleanly(capsys, tmp_path, ["inspect", "resnet20", "--weights", str(bad)],
                  f"{bad} is not a valid safetensors file")


def test_weights_of_another_architecture_are_summarised(tmp_path, capsys):
    torch.manual_seed(0)
    save_file(models.get("edsr_baseline_x2").state_dict(), str(tmp_path / "edsr.safetensors"))
    line = fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--weights", str(tmp_path / "edsr.safetensors"),
                                            *COMPRESS, "-o", str(tmp_path / "out")],
                         "do not fit", "missing keys (conv1.weight", "unexpected (")
    n_keys = len(models.get("resnet20").state_dict())
    assert f"{n_keys} missing keys" in line and len(line) < 400          # counts and a few names, not 6.8 KB


def test_weights_with_a_wrong_shape_name_the_first(tmp_path, capsys, resnet20_weights):
    state = dict(resnet20_weights)
    state["layer2.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    fails_cleanly(capsys, tmp_path, ["inspect", "resnet20", "--weights", str(tmp_path / "w.pt")],
                  "1 shape mismatches (first: layer2.0.conv1.weight is (8, 16, 3, 3) in the file")


def test_nan_weights_name_the_layer(tmp_path, capsys, resnet20_weights):
    state = dict(resnet20_weights)
    state["layer1.1.conv2.weight"] = state["layer1.1.conv2.weight"].clone()
    state["layer1.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    fails_cleanly(capsys, tmp_path, ["inspect", "resnet20", "--weights", str(tmp_path / "nan.safetensors")],
                  "NaN or infinite", "layer1.1.conv2.weight")


# ------------------------------------------------------------------ rules and plan files
def test_malformed_yaml_rules_give_line_and_column(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- op_types: [Conv2d\n  method: channel_svd\n  rank: 4\n")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--rules", str(rules), "-o", str(tmp_path / "out")],
                  f"rules file {rules}: invalid YAML at line", "column")


def test_empty_rules_file(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("\n")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--rules", str(rules), "-o", str(tmp_path / "out")],
                  f"rules file {rules} is empty")
    rules.write_text("just a string\n")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--rules", str(rules), "-o", str(tmp_path / "out")],
                  "must hold a non-empty list of rules")


def test_malformed_plan_file(tmp_path, capsys):
    bad = tmp_path / "plan.yaml"
    bad.write_text("layers:\n  - name: conv1\n    ranks: [4\n")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--plan", str(bad), "-o", str(tmp_path / "out")],
                  f"plan file {bad}: invalid YAML at line")
    bad = tmp_path / "plan.json"
    bad.write_text('{"layers": [}')
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", "--plan", str(bad), "-o", str(tmp_path / "out")],
                  f"plan file {bad}: invalid JSON at line 1, column 13")


def test_plan_for_resnet20_refused_on_resnet56(tmp_path, capsys):
    plan_file = tmp_path / "p.yaml"
    assert main(["plan", "resnet20", "--target", "macs=50%", "--criterion", "budget", "-o", str(plan_file)]) == 0
    fails_cleanly(capsys, tmp_path, ["compress", "resnet56", "--plan", str(plan_file), "-o", str(tmp_path / "out")],
                  "made for another model (resnet20)", "layer1.3.conv1 is in this model but not in the plan's")


# ------------------------------------------------------------------ finetune
def test_finetune_classification_on_builtin_data_is_refused(tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, ["finetune", "resnet20", "--data", "builtin", "--steps", "2",
                                     "-o", str(tmp_path / "tuned")],
                  "built-in data", "21 photos as classes", "model's 10 outputs")


def _images(folder):
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_finetune_rerun_with_other_settings_refuses_or_starts_fresh(tmp_path, capsys):
    data = _images(tmp_path / "imgs")
    ckpt = tmp_path / "ckpt"
    base = ["finetune", "dncnn", "--data", str(data), "--steps", "2", "--batch-size", "1", "--patch-size", "8",
            "--threads", "1", "--checkpoint-dir", str(ckpt)]
    assert main(base + ["--lr", "1e-3", "-o", str(tmp_path / "a")]) == 0
    assert json.loads((ckpt / "latest.json").read_text())["extra"]["settings"]["lr"] == 1e-3
    # a new --lr on the finished checkpoint: refused, nothing written, nothing resumed
    fails_cleanly(capsys, tmp_path, base + ["--lr", "1e-2", "-o", str(tmp_path / "b")],
                  f"checkpoint in {ckpt} was written with lr=0.001 (now 0.01)", "--overwrite")
    fails_cleanly(capsys, tmp_path, base + ["--optimizer", "sgd", "--lr", "1e-3", "-o", str(tmp_path / "b")],
                  "optimizer='adam' (now 'sgd')")
    # the same -o again: an existing output is never replaced without --overwrite
    fails_cleanly(capsys, tmp_path, base + ["--lr", "1e-3", "-o", str(tmp_path / "a")], "--overwrite")
    # --overwrite starts fresh: the checkpoint and the output record the new settings, and only them
    assert main(base + ["--lr", "1e-2", "--overwrite", "-o", str(tmp_path / "a")]) == 0
    assert json.loads((ckpt / "latest.json").read_text())["extra"]["settings"]["lr"] == 1e-2
    assert [f.name for f in ckpt.glob("ckpt-*")] == ["ckpt-00000002.safetensors"]
    assert json.loads((tmp_path / "a" / "recipe.json").read_text())["metadata"]["finetune"]["lr"] == 1e-2


# ------------------------------------------------------------------ outputs are never replaced by surprise
def test_compress_into_its_earlier_output_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "resnet20", *COMPRESS, "-o", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", *COMPRESS, "-o", str(out)], f"{out}", "--overwrite")
    recipe_before = (out / "recipe.json").read_bytes()
    assert main(["compress", "resnet20", "--method", "channel_svd", "--rank", "2", "--op-names", "layer1.0.*",
                 "--overwrite", "-o", str(out)]) == 0
    assert (out / "my_notes.txt").read_text() == "mine"                    # kept
    assert (out / "recipe.json").read_bytes() != recipe_before             # convfactor's own files replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_compress_refuses_a_directory_that_is_not_its_own(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"their model")
    fails_cleanly(capsys, tmp_path, ["compress", "resnet20", *COMPRESS, "--overwrite", "-o", str(out)],
                  "not a convfactor model directory")


def test_export_and_plan_do_not_overwrite_existing_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "resnet20", *COMPRESS, "-o", str(out)]) == 0
    (tmp_path / "m.onnx").write_bytes(b"an older export")
    (tmp_path / "p.yaml").write_text("my plan")
    fails_cleanly(capsys, tmp_path, ["export", str(out), "-o", str(tmp_path / "m.onnx")], "exists", "--overwrite")
    fails_cleanly(capsys, tmp_path, ["plan", "resnet20", "--target", "macs=50%", "--criterion", "budget",
                                     "-o", str(tmp_path / "p.yaml")], "exists", "--overwrite")
    assert main(["export", str(out), "--overwrite", "--no-check", "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() != b"an older export"


def test_plan_into_an_existing_directory_leaves_nothing_behind(tmp_path, capsys):
    (tmp_path / "plans").mkdir()
    for extra in ([], ["--overwrite"]):
        fails_cleanly(capsys, tmp_path, ["plan", "resnet20", "--target", "macs=50%", "--criterion", "budget",
                                         *extra, "-o", str(tmp_path / "plans")], "is a directory")


def test_finetune_output_that_exists_is_refused(tmp_path, capsys):
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "keep.txt").write_text("mine")
    fails_cleanly(capsys, tmp_path, ["finetune", "dncnn", "--steps", "1", "-o", str(tmp_path / "tuned")],
                  "--overwrite")


def test_report_does_not_replace_a_report_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "resnet20", *COMPRESS, "-o", str(out)]) == 0
    (out / "report.json").unlink()
    (out / "report.md").write_text("my own notes")
    fails_cleanly(capsys, tmp_path, ["report", str(out)], "report.md exists and was not written by convfactor")


def test_compress_that_compresses_nothing_says_so(tmp_path, capsys):
    assert main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.01", "--op-names", "conv*",
                 "-o", str(tmp_path / "out")]) == 0
    assert "nothing was compressed" in capsys.readouterr().out


# ------------------------------------------------------------------ the library calls behind the CLI
def test_plan_names_the_first_layer_whose_shape_differs():
    from convfactor.rank import plan
    model = models.get("resnet20").eval()
    p = plan(model, models.default_input("resnet20"), target="macs=50%", criterion="budget", model_name="resnet20")
    assert p.model_layers["fc"] == [10, 64] and p.model_layers["conv1"] == [16, 3, 3, 3]
    other = models.get("resnet20").eval()
    other.fc = torch.nn.Linear(64, 100)
    with pytest.raises(ValueError, match=r"fc has weight shape \(100, 64\) here, \(10, 64\) in the plan's model"):
        p.apply(other)
    old = type(p).from_dict({**p.to_dict(), "version": 1, "model_layers": {}})     # plans before the record
    old.apply(other)


def test_weights_saved_from_data_parallel_load(tmp_path, resnet20_weights):
    from convfactor.io import load_weights
    torch.save({f"module.{k}": v for k, v in resnet20_weights.items()}, tmp_path / "dp.pt")
    model = load_weights(models.get("resnet20"), tmp_path / "dp.pt")
    assert torch.equal(model.conv1.weight, resnet20_weights["conv1.weight"])


def test_a_fresh_finetune_removes_the_older_runs_checkpoints(tmp_path):
    """resume=False (or a restart on other settings) never leaves an older run's files to be mixed in."""
    from convfactor.train import checkpoint as ckpt
    from convfactor.train.finetune import CheckpointConfig, FinetuneConfig, finetune
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1))
    data = [(torch.randn(3, 8, 8), torch.randn(3, 8, 8)) for _ in range(4)]
    ckpt.save_checkpoint(tmp_path, 8, net)                                   # an older, longer run
    (tmp_path / "notes.txt").write_text("mine")
    config = FinetuneConfig(steps=2, batch_size=2, loss="mse", progress=False,
                            checkpoint=CheckpointConfig(tmp_path, every=1, resume=False))
    finetune(net, data, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002.safetensors", "latest.json", "notes.txt"]
    assert ckpt.latest_step(tmp_path) == 2
