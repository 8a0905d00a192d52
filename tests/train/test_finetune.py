"""finetune(): optimizers/schedules, distillation, checkpoints, resume after interruption and kill."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from finetune_models import press_ctrl_c
from torch import nn

from convfactor.compression.api import compress
from convfactor.train import checkpoint as ckpt
from convfactor.train.finetune import (CheckpointConfig, DistillConfig, FinetuneConfig, Interrupted, OptimizerConfig,
                                       batch_for_step, finetune, lr_factor, resume_step)



def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(8, 3, 3, padding=1))


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return torch.utils.data.TensorDataset(x, 0.5 * x.roll(1, dims=1) + 0.1 * torch.randn(n, 3, 8, 8, generator=g))


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _config(optimizer="adam", schedule="cosine", checkpoint_dir=None, checkpoint_every=100) -> FinetuneConfig:
    """12 steps of batch 4 at lr 1e-2, no progress bar: the runs the resume tests compare."""
    return FinetuneConfig(steps=12, batch_size=4, optimizer=OptimizerConfig(optimizer, lr=1e-2, schedule=schedule),
                          checkpoint=CheckpointConfig(checkpoint_dir, every=checkpoint_every), progress=False)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", "step")])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, optimizer, schedule):
    ref = finetune(_net(), _data(), _config(optimizer, schedule))

    def stop_at_8(step, loss):
        if step == 8:
            raise _Interrupt
    with pytest.raises(_Interrupt):
        finetune(_net(), _data(), _config(optimizer, schedule, tmp_path, 5), callback=stop_at_8)
    assert ckpt.latest_step(tmp_path) == 5            # lost 3 steps, less than one interval
    history = []
    resumed = finetune(_net(), _data(), _config(optimizer, schedule, tmp_path, 5), history=history)
    assert [h["step"] for h in history] == list(range(6, 13))
    assert _equal(resumed, ref)
    assert ckpt.latest_step(tmp_path) == 12
    assert len(list(tmp_path.glob("ckpt-*.safetensors"))) == 1


def test_resume_after_sigkill_of_a_subprocess(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        torch.set_num_threads(1)
        from test_finetune import _net, _data, _config
        from convfactor.train.finetune import finetune
        def kill(step, loss):
            if step == 9:
                os.kill(os.getpid(), signal.SIGKILL)
        finetune(_net(), _data(), _config(checkpoint_dir={str(tmp_path)!r}, checkpoint_every=4), callback=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert ckpt.latest_step(tmp_path) == 8
    history = []
    resumed = finetune(_net(), _data(), _config(checkpoint_dir=tmp_path, checkpoint_every=4), history=history)
    assert history[0]["step"] == 9 and history[-1]["step"] == 12
    assert _equal(resumed, finetune(_net(), _data(), _config()))


def test_ctrl_c_is_held_to_the_end_of_the_step_whose_checkpoint_resumes_exactly(tmp_path):
    """The first SIGINT lets the step (and the callback) finish, then the checkpoint of that step is
    written and Interrupted (a KeyboardInterrupt) raised; the resume ends where the straight run ends."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ref = finetune(_net(), _data(), _config())
    went_on = []

    def ctrl_c(step, loss):
        if step == 7:
            press_ctrl_c()
            went_on.append(step)                       # held: the callback runs on
    with pytest.raises(Interrupted) as stop:
        finetune(_net(), _data(), _config(checkpoint_dir=tmp_path, checkpoint_every=5), callback=ctrl_c)
    assert isinstance(stop.value, KeyboardInterrupt) and went_on == [7]
    assert (stop.value.step, stop.value.steps, stop.value.saved, stop.value.checkpoint_step) == (7, 12, True, 7)
    assert ckpt.latest_step(tmp_path) == 7 and len(list(tmp_path.glob("ckpt-*"))) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler          # restored
    assert resume_step(_config(checkpoint_dir=tmp_path, checkpoint_every=5)) == 7
    assert _equal(finetune(_net(), _data(), _config(checkpoint_dir=tmp_path, checkpoint_every=5)), ref)


def test_a_second_ctrl_c_stops_inside_the_step_and_keeps_the_last_checkpoint(tmp_path):
    data = _data()

    def batches(step, generator):                      # two Ctrl-C while step 7 draws its batch
        if step == 6:
            press_ctrl_c()
            press_ctrl_c()
        return batch_for_step(data, step, 4, 0)
    model = _net()
    with pytest.raises(Interrupted) as stop:
        finetune(model, batches, _config(checkpoint_dir=tmp_path, checkpoint_every=5))
    assert (stop.value.step, stop.value.saved, stop.value.checkpoint_step) == (6, False, 5)
    assert ckpt.latest_step(tmp_path) == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_step_reads_the_checkpoint_without_loading_it(tmp_path):
    assert resume_step(_config(checkpoint_dir=tmp_path)) is None
    finetune(_net(), _data(), _config(checkpoint_dir=tmp_path, checkpoint_every=5))
    assert resume_step(_config(checkpoint_dir=tmp_path)) == 12
    other = FinetuneConfig(steps=12, batch_size=4, optimizer=OptimizerConfig(lr=1e-3), progress=False,
                           checkpoint=CheckpointConfig(tmp_path))
    with pytest.raises(ValueError, match=r"lr=0.01 \(now 0.001\)"):
        resume_step(other)
    fresh = FinetuneConfig(**{**other.__dict__, "checkpoint": CheckpointConfig(tmp_path, restart_on_mismatch=True)})
    assert resume_step(fresh) is None and ckpt.latest_step(tmp_path) == 12       # nothing removed by asking


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _net()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, 1, model, opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, opt)
    fresh = _net(seed=5)
    fresh_opt = torch.optim.Adam(fresh.parameters(), 1e-3)
    meta = ckpt.load_checkpoint(tmp_path, fresh, fresh_opt)
    assert meta["step"] == 1
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0


def test_optimizer_state_flattening_round_trips():
    model = _net()
    for opt in (torch.optim.Adam(model.parameters(), 1e-3),
                torch.optim.SGD(model.parameters(), 1e-2, momentum=0.9)):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        tensors, meta = ckpt.flatten_optimizer_state(opt.state_dict())
        json.dumps(meta)                                      # JSON-able, no pickle
        back = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
        orig = opt.state_dict()
        assert back["state"].keys() == orig["state"].keys()
        for i, entry in orig["state"].items():
            for key, value in entry.items():
                assert torch.equal(back["state"][i][key], value) if torch.is_tensor(value) else back["state"][i][key] == value


def test_lr_schedules():
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert [lr_factor(s, 90, "step", step_size=30, gamma=0.1) for s in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(0, 100, "constant", warmup=4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "linear")


def test_training_reduces_the_loss_and_returns_the_same_plain_module():
    model = _net()
    history = []
    cfg = FinetuneConfig(steps=30, batch_size=8, optimizer=OptimizerConfig(lr=3e-2), progress=False, loss="mse")
    out = finetune(model, _data(), cfg, history=history)
    assert out is model and not out.training and type(out) is nn.Sequential
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.7 * first
    assert history[0]["lr"] > history[-1]["lr"]


def test_batches_depend_on_seed_step_and_rank_only():
    data = _data()
    a = batch_for_step(data, 3, 4, seed=0)
    assert torch.equal(a[0], batch_for_step(data, 3, 4, seed=0)[0])
    assert not torch.equal(a[0], batch_for_step(data, 4, 4, seed=0)[0])
    assert not torch.equal(a[0], batch_for_step(data, 3, 4, seed=0, rank=1)[0])


def test_output_and_feature_distillation_pull_the_student_to_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 3, 3, padding=1)).eval()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    student, _ = compress(teacher, [{"op_types": ["Conv2d"], "op_names": ["2"], "method": "channel_svd", "rank": 2}], x)
    inputs = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def gaps(model):
        with torch.no_grad():
            out = (model(inputs) - teacher(inputs)).pow(2).mean().item()
            feat = (model[:3](inputs) - teacher[:3](inputs)).pow(2).mean().item()
        return out, feat
    out_before, feat_before = gaps(student)
    cfg = FinetuneConfig(steps=60, batch_size=8, optimizer=OptimizerConfig(lr=1e-2), progress=False,
                         distill=DistillConfig(loss="mse", feature_layers=["2"], feature_weight=1.0))
    tuned = finetune(student, inputs, cfg, teacher=teacher)
    out_after, feat_after = gaps(tuned)
    assert out_after < 0.7 * out_before and feat_after < 0.9 * feat_before
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_kl_distillation_for_classifiers():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(64, 12)
    y = teacher(x).argmax(1).detach()
    data = torch.utils.data.TensorDataset(x, y)

    def agree(m):
        with torch.no_grad():
            return (m(x).argmax(1) == y).float().mean().item()
    assert agree(student) < 0.7
    finetune(student, data, FinetuneConfig(steps=60, batch_size=16, optimizer=OptimizerConfig(lr=5e-2), loss="ce",
                                           task_weight=0.0, progress=False), teacher=teacher)
    assert agree(student) > 0.9


@pytest.mark.parametrize("settings,match", [
    (dict(steps=-1), "steps"), (dict(steps=2, optimizer=dict(name="lbfgs")), "optimizer"),
    (dict(steps=2, optimizer=dict(schedule="poly")), "schedule"), (dict(steps=2, loss="huber"), "loss"),
    (dict(steps=2, distill=dict(feature_layers=["0"])), "teacher"),
    (dict(steps=2, checkpoint=dict(every=0)), "checkpoint_every"),
    (dict(steps=2, distill=dict(loss="huber")), "distillation loss"), (dict(steps=2, batch_size=0), "batch_size"),
])
def test_bad_configuration_fails_before_training(tmp_path, settings, match):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def build() -> FinetuneConfig:
        """The config of ``settings``, sub-configs from their dicts, checkpoints in tmp_path/ck."""
        s = dict(settings)
        ck = CheckpointConfig(tmp_path / "ck", **s.pop("checkpoint", {}))
        opt, distill = OptimizerConfig(**s.pop("optimizer", {})), DistillConfig(**s.pop("distill", {}))
        return FinetuneConfig(**s, progress=False, checkpoint=ck, optimizer=opt, distill=distill)
    with pytest.raises(ValueError, match=match):
        finetune(model, _data(), build())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "ck").exists()


def test_unknown_feature_layer_and_missing_targets_are_clear_errors():
    with pytest.raises(ValueError, match="not a submodule"):
        finetune(_net(), _data(), FinetuneConfig(steps=1, distill=DistillConfig(feature_layers=["nope"]),
                                                 progress=False), teacher=_net(1))
    with pytest.raises(ValueError, match="nothing to optimize"):
        finetune(_net(), torch.randn(8, 3, 8, 8), FinetuneConfig(steps=1, progress=False))


def test_basis_regularizer_is_applied_when_the_model_has_basis_layers():
    basis = pytest.importorskip("convfactor.methods.basis")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    compressed, _ = compress(net, [{"op_types": ["Conv2d"], "op_names": ["0"], "method": "basis", "rank": 3}],
                             torch.randn(1, 8, 6, 6))
    assert any(isinstance(m, basis.BasisConv2d) for m in compressed.modules())
    with torch.no_grad():                       # drift away from the original kernel
        for p in compressed[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    start = float(basis.basis_regularizer(compressed, original=net).detach())
    # no ground truth, no distillation output loss: only the regularizer can move the weights
    finetune(compressed, torch.randn(16, 8, 6, 6), FinetuneConfig(steps=30, batch_size=4, optimizer=OptimizerConfig(
        lr=1e-2), distill=DistillConfig(weight=0.0), basis_weight=1.0, progress=False), teacher=net)
    assert float(basis.basis_regularizer(compressed, original=net).detach()) < 0.5 * start


def test_the_teacher_is_handed_back_as_it_came():
    """Distillation freezes the teacher and puts it in eval mode while it teaches, then restores both: the
    caller's model can still be trained afterwards (it was frozen for good before)."""
    student, teacher = _net(0), _net(1)
    teacher.train()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    finetune(student, _data(), _config(), teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    teacher[0].weight.requires_grad_(False)                 # a caller's own frozen layer stays frozen
    finetune(_net(2), _data(), _config(), teacher=teacher)
    assert not teacher[0].weight.requires_grad and teacher[4].weight.requires_grad
