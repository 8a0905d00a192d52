"""Multi-stage compression (issue 15): per-stage targets, fold-back between stages, and a stage resume
after a kill that ends where the uninterrupted run ends."""
import json

import pytest
import torch

from convfactor.methods.base import Factorized
from convfactor.recipes import pipeline
from convfactor.recipes.pipeline import PipelineConfig, compress_finetune_measure, stage_settings


def _cfg(tmp, **kw) -> PipelineConfig:
    return PipelineConfig(**{**dict(input_size=24, steps=4, batch_size=2, patch_size=16, eval_side=48, eval_limit=1,
                                    planner="budget", threads=1, speed_repeats=2, speed_max_rounds=3, train_side=64,
                                    progress=False, report_backends=("torch",), stages=2,
                                    checkpoint_dir=str(tmp)), **kw})


def test_stage_settings_split_the_request_and_the_steps(tmp_path):
    cfg = _cfg(tmp_path, speedup=4.0, steps=9, stages=3)
    parts = [stage_settings(cfg, k) for k in range(3)]
    assert [round(p.speedup, 6) for p in parts] == [round(4 ** (1 / 3), 6), round(4 ** (2 / 3), 6), 4.0]
    assert [p.steps for p in parts] == [3, 3, 3] and sum(p.steps for p in parts) == 9
    assert parts[1].checkpoint_dir == f"{tmp_path}/stage2" and all(p.stages == 1 for p in parts)
    with pytest.raises(ValueError, match="stages"):
        PipelineConfig(stages=0)
    with pytest.raises(ValueError, match="at least one fine-tuning step"):
        PipelineConfig(stages=3, steps=2)


def test_two_stages_resume_after_a_kill_and_match_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = compress_finetune_measure(_cfg(tmp_path / "a"), log=lambda *a: None)
    assert [h["stage"] for h in straight.finetune_history] == [1, 1, 2, 2]
    assert straight.plan_kind.startswith("2 stages") and straight.macs.ratio < 1
    factorized = [m for m in straight.compressed.modules() if isinstance(m, Factorized)]
    assert factorized and all(not isinstance(p, Factorized) for m in factorized for p in m)   # one level, folded between
    stage1 = json.loads((tmp_path / "a" / "stage1" / "stage.json").read_text())
    assert stage1["plan"]["target"]["macs"] == pytest.approx(1 / 3 ** 0.5)

    real = pipeline._finetune
    calls = []

    def dies_in_stage_two(compressed, original, info, cfg):
        calls.append(cfg.checkpoint_dir)
        if cfg.checkpoint_dir.endswith("stage2"):
            raise KeyboardInterrupt("killed")
        return real(compressed, original, info, cfg)
    monkeypatch.setattr(pipeline, "_finetune", dies_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        compress_finetune_measure(_cfg(tmp_path / "b"), log=lambda *a: None)
    monkeypatch.setattr(pipeline, "_finetune", lambda *a: calls.append(a[3].checkpoint_dir) or real(*a))
    lines = []
    resumed = compress_finetune_measure(_cfg(tmp_path / "b"), log=lines.append)
    assert calls == [f"{tmp_path}/b/stage1", f"{tmp_path}/b/stage2", f"{tmp_path}/b/stage2"]   # stage 1 not redone
    assert any("stage found finished" in line for line in lines)
    a, b = straight.compressed.state_dict(), resumed.compressed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_stage_with_other_settings_is_refused(tmp_path):
    compress_finetune_measure(_cfg(tmp_path, stages=2, steps=2), log=lambda *a: None)
    with pytest.raises(ValueError, match="other settings"):
        compress_finetune_measure(_cfg(tmp_path, stages=2, steps=2, lr=1e-3), log=lambda *a: None)
