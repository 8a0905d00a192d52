"""Issue 23, `convfactor finetune` for a new user: --scale for any SR model, a teacher from a directory or
a spec with its weights, the model checked against the task's data before any work, Ctrl-C as one line
with a checkpoint to resume from, every option's help with its default, a first line at once and a
checkpoint with other settings refused before the set-up.  Tiny models (``finetune_models``) and a
folder of small photos keep every run to a second or two."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from convfactor import cli, io, models
from convfactor.commands import finetune as command
from convfactor.train import checkpoint as ckpt
from finetune_models import press_ctrl_c

HERE = Path(__file__).resolve().parent
QUICK = ["--steps", "4", "--batch-size", "2", "--patch-size", "8", "--threads", "1", "--checkpoint-every", "2"]
RGB_DENOISER = ["finetune_models:denoiser_rgb", "--task", "denoise", "--input-size", "1x3x16x16"]


@pytest.fixture(autouse=True)
def _tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))          # finetune_models:FACTORY on the command line


@pytest.fixture()
def photos(tmp_path):
    """A folder of two 36x40 RGB photos (SR: HR images; denoising: clean images)."""
    from PIL import Image
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        base = np.linspace(0, 255, 40)[None, :, None] * np.ones((36, 1, 3))
        Image.fromarray(np.clip(base + rng.normal(0, 20, (36, 40, 3)), 0, 255).astype(np.uint8)).save(
            folder / f"im{i}.png")
    return folder


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def fails_cleanly(capsys, root, argv: list[str], *needles: str) -> str:
    """Exit 2, one stderr line ``convfactor finetune: error: ...`` holding every needle, nothing written."""
    before = snapshot(root)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("convfactor finetune: error: "), err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    assert snapshot(root) == before
    return err[0]


def state(path, spec: str) -> dict:
    return io.load(path, models.get(spec)).state_dict()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 1. --scale
def test_an_sr_model_of_unknown_scale_needs_scale_and_trains_with_it(tmp_path, capsys, photos):
    sr = ["finetune", "finetune_models:sr_x2", "--task", "sr", "--input-size", "1x3x8x8", "--data", str(photos)]
    fails_cleanly(capsys, tmp_path, [*sr, *QUICK, "-o", str(tmp_path / "a")], "pass --scale N")
    fails_cleanly(capsys, tmp_path, [*sr, "--scale", "4", *QUICK, "-o", str(tmp_path / "a")],
                  "turns a 1x3x8x8 input into 1x3x16x16, not an x4 SR output 1x3x32x32", "--scale")
    assert cli.main([*sr, "--scale", "2", *QUICK, "-o", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "recipe.json").read_text())["metadata"]
    assert (meta["task"], meta["scale"], meta["finetune"]["scale"]) == ("sr", 2, 2)
    assert json.loads((tmp_path / "a.ckpt" / "latest.json").read_text())["extra"]["settings"]["scale"] == 2
    # the directory records its task and scale: fine-tuning it again needs neither
    assert cli.main(["finetune", str(tmp_path / "a"), "--data", str(photos), *QUICK, "-o", str(tmp_path / "b")]) == 0
    assert "(SR x2)" in capsys.readouterr().out


def test_scale_is_refused_for_other_tasks(tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, ["finetune", *RGB_DENOISER, "--scale", "2", *QUICK, "-o", str(tmp_path / "a")],
                  "--scale is for SR models")


# ------------------------------------------------------------------ 2. --distill-from a directory or a spec
def test_a_teacher_from_a_directory_a_spec_with_weights_or_base_teaches_the_same(tmp_path, capsys, photos):
    spec = "finetune_models:denoiser_rgb"
    teacher = models.get(spec, seed=1)                          # other weights than the student's (seed 0)
    io.save(teacher, tmp_path / "teacher", metadata={"model": spec, "input_shape": [1, 3, 16, 16]})
    io.save(models.get(spec), tmp_path / "student", metadata={"model": spec, "input_shape": [1, 3, 16, 16],
                                                              "task": "denoise"})
    from safetensors.torch import save_file
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    pure = ["--data", str(photos), "--task-weight", "0", "--lr", "1e-2", *QUICK]
    runs = {"dir": ["--distill-from", str(tmp_path / "teacher")],
            "spec": ["--distill-from", spec, "--distill-weights", str(tmp_path / "teacher.safetensors")],
            "base": ["--distill-from", "base", "--distill-weights", str(tmp_path / "teacher.safetensors")]}
    for name, how in runs.items():
        assert cli.main(["finetune", str(tmp_path / "student"), *pure, *how, "-o", str(tmp_path / name)]) == 0
    outs = {name: state(tmp_path / name, spec) for name in runs}
    assert same_state(outs["dir"], outs["spec"]) and same_state(outs["dir"], outs["base"])
    assert not same_state(outs["dir"], models.get(spec).state_dict())         # it learnt something
    settings = json.loads((tmp_path / "dir.ckpt" / "latest.json").read_text())["extra"]["settings"]
    assert settings["distill_from"] == str((tmp_path / "teacher").resolve())
    meta = json.loads((tmp_path / "spec" / "recipe.json").read_text())["metadata"]["finetune"]
    assert meta["distill_weights"] == str(tmp_path / "teacher.safetensors")


def test_teacher_mistakes_are_one_line_before_any_work(tmp_path, capsys):
    spec = "finetune_models:denoiser_rgb"
    io.save(models.get(spec), tmp_path / "teacher", metadata={"model": spec, "input_shape": [1, 3, 16, 16]})
    (tmp_path / "w.safetensors").write_bytes(b"")
    out = ["-o", str(tmp_path / "o")]
    cases = [(["--distill-from", spec], "needs --distill-weights FILE"),
             (["--distill-weights", str(tmp_path / "w.safetensors")], "--distill-weights needs --distill-from"),
             (["--distill-from", str(tmp_path / "teacher"), "--distill-weights", str(tmp_path / "w.safetensors")],
              "holds its own weights"),
             (["--distill-from", str(tmp_path / "w.safetensors")], "pass this file as --distill-weights"),
             (["--distill-from", "no_such_model"], "is not 'base', a built-in model, a convfactor directory"),
             (["--distill-from", "dncnn"], "--distill-from dncnn: the model does not run on an input of size "
                                           "1x3x16x16")]
    for extra, needle in cases:
        fails_cleanly(capsys, tmp_path, ["finetune", *RGB_DENOISER, *QUICK, *extra, *out], needle)


# ------------------------------------------------------------------ 3. the model against the task's data
def test_an_rgb_denoiser_trains_on_rgb_data(tmp_path, capsys, photos):
    assert cli.main(["finetune", *RGB_DENOISER, "--data", str(photos), *QUICK, "-o", str(tmp_path / "rgb")]) == 0
    grey = ["finetune_models:denoiser_grey", "--task", "denoise", "--input-size", "1x1x16x16"]
    assert cli.main(["finetune", *grey, "--data", str(photos), *QUICK, "-o", str(tmp_path / "grey")]) == 0


def test_a_model_that_does_not_fit_the_task_is_refused_before_any_work(tmp_path, capsys):
    out = [*QUICK, "-o", str(tmp_path / "o")]
    fails_cleanly(capsys, tmp_path, ["finetune", "finetune_models:sr_x2", "--task", "denoise", "--input-size",
                                     "1x3x16x16", *out],
                  "turns a 1x3x16x16 input into 1x3x32x32, not a denoiser's output", "check --task")
    fails_cleanly(capsys, tmp_path, ["finetune", "finetune_models:denoiser_grey", "--task", "sr", "--scale", "2",
                                     "--input-size", "1x1x16x16", *out],
                  "SR data is RGB (3 channels); the model takes 1 input channel")
    fails_cleanly(capsys, tmp_path, ["finetune", "finetune_models:denoiser_rgb", "--task", "classification",
                                     "--input-size", "1x3x16x16", *out], "a classifier's output is (batch, classes)")


# ------------------------------------------------------------------ 4. Ctrl-C
def _sigint_at(monkeypatch, at: int):
    """The command's training sends itself SIGINT (a real Ctrl-C) after step ``at``; returns the real
    training function."""
    real = command.finetune

    def interrupted(*args, **kw):
        def ctrl_c(step, loss):
            if step == at:
                press_ctrl_c()
        return real(*args, callback=ctrl_c, **kw)
    monkeypatch.setattr(command, "finetune", interrupted)
    return real


def test_ctrl_c_saves_a_checkpoint_and_the_resume_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch,
                                                                                photos):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    argv = ["finetune", *RGB_DENOISER, "--data", str(photos), "--steps", "6", "--batch-size", "2", "--patch-size",
            "8", "--threads", "1", "--lr", "1e-2"]
    assert cli.main([*argv, "-o", str(tmp_path / "straight")]) == 0
    real = _sigint_at(monkeypatch, 3)
    capsys.readouterr()
    assert cli.main([*argv, "-o", str(tmp_path / "tuned")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"convfactor finetune: interrupted at step 3 of 6; checkpoint saved to "
                                            f"{tmp_path / 'tuned.ckpt'}; re-run the same command to resume")
    assert ckpt.latest_step(tmp_path / "tuned.ckpt") == 3 and not (tmp_path / "tuned").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler          # restored
    monkeypatch.setattr(command, "finetune", real)
    assert cli.main([*argv, "-o", str(tmp_path / "tuned")]) == 0
    assert "resuming from the checkpoint at step 3" in capsys.readouterr().out
    spec = "finetune_models:denoiser_rgb"
    assert same_state(state(tmp_path / "tuned", spec), state(tmp_path / "straight", spec))


def test_ctrl_c_during_the_set_up_writes_nothing(tmp_path, capsys, monkeypatch):
    def stopped(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(command, "load_model", stopped)
    before = snapshot(tmp_path)
    assert cli.main(["finetune", *RGB_DENOISER, *QUICK, "-o", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "convfactor finetune: interrupted before training started; nothing written"]
    assert snapshot(tmp_path) == before


def test_ctrl_c_while_writing_the_output_leaves_the_checkpoint_to_finish_from(tmp_path, capsys, monkeypatch, photos):
    def stopped(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(io, "save", stopped)
    argv = ["finetune", *RGB_DENOISER, "--data", str(photos), *QUICK, "-o", str(tmp_path / "o")]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"convfactor finetune: interrupted while writing {tmp_path / 'o'}; the trained model is in the checkpoint "
        f"in {tmp_path / 'o'}.ckpt; re-run the same command to write it")
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(HERE))
    assert cli.main(argv) == 0 and (tmp_path / "o" / "recipe.json").is_file()
    assert "resuming from the checkpoint at step 4" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_of_the_process_exits_130_with_one_line(tmp_path, photos):
    """A real process: SIGINT from outside at step 2, exit status 130, one line, no traceback."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        from convfactor import cli
        from convfactor.commands import finetune as command
        real = command.finetune
        def finetune(*args, **kw):
            def ctrl_c(step, loss):
                if step == 2:
                    os.kill(os.getpid(), signal.SIGINT)
            return real(*args, callback=ctrl_c, **kw)
        command.finetune = finetune
        sys.exit(cli.main({["finetune", *RGB_DENOISER, "--data", str(photos), *QUICK, "--checkpoint-every", "100",
                            "-o", str(tmp_path / "o")]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(HERE)})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("interrupted at step 2 of 4; checkpoint saved to "
                                                         f"{tmp_path / 'o.ckpt'}; re-run the same command to resume")
    assert ckpt.latest_step(tmp_path / "o.ckpt") == 2


# ------------------------------------------------------------------ 5. every option's help and default
def test_every_finetune_option_has_help_with_its_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    common = {"help", "model", "weights", "pretrained", "trust_pickle", "input_size"}   # commands/common.py's
    for action in sub._actions:
        if action.dest in common:
            continue
        assert action.help, action.dest
        if not action.required and action.default not in (None, False):
            assert "%(default)s" in action.help or "default: none" in action.help, action.dest
        elif not action.required and action.default is None:
            assert "default" in action.help, action.dest
    text = sub.format_help()
    assert "steps between checkpoints; one is also written at the end and on Ctrl-C (default: 100)" in " ".join(
        text.split())
    assert "optimizer steps (default: 1000)" in " ".join(text.split())


# ------------------------------------------------------------------ 6. a first line at once; the checkpoint first
def test_the_first_line_comes_before_the_set_up(tmp_path, capsys, monkeypatch):
    seen = []

    def load_model(args):
        seen.append(capsys.readouterr().out)
        raise ValueError("stop here")
    monkeypatch.setattr(command, "load_model", load_model)
    assert cli.main(["finetune", *RGB_DENOISER, *QUICK, "-o", str(tmp_path / "o")]) == 2
    assert seen == ["fine-tuning finetune_models:denoiser_rgb (denoising at sigma 25) for 4 steps of batch 2 on cpu "
                    f"(1 thread), data: builtin; a checkpoint every 2 steps in {tmp_path / 'o'}.ckpt\n"]


def test_a_checkpoint_with_other_settings_is_refused_before_the_set_up(tmp_path, capsys, monkeypatch, photos):
    argv = ["finetune", *RGB_DENOISER, "--data", str(photos), *QUICK, "--checkpoint-dir", str(tmp_path / "ck")]
    assert cli.main([*argv, "--lr", "1e-3", "-o", str(tmp_path / "a")]) == 0

    def no_set_up(*args, **kw):
        raise AssertionError("the set-up ran before the checkpoint was checked")
    for name in ("load_model", "load_teacher", "training_set", "finetune"):
        monkeypatch.setattr(command, name, no_set_up)
    fails_cleanly(capsys, tmp_path, [*argv, "--lr", "1e-2", "-o", str(tmp_path / "b")],
                  "was written with lr=0.001 (now 0.01)")
