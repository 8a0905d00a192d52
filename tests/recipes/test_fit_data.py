"""fit="data" in the pipeline and the demo (issue 22): calibration crops of the training photos, never the
held-out ones; the demo's fine-tuning defaults follow the model's recommendation."""
import argparse

import pytest
import torch

from convfactor import models
from convfactor.commands import demo
from convfactor.recipes.pipeline import PipelineConfig, default_demo_model, fit_calibration


def test_a_bad_fit_is_refused():
    with pytest.raises(ValueError, match="fit must be"):
        PipelineConfig(fit="both")


def test_calibration_crops_are_training_photo_lr_crops_within_the_cropped_photos():
    info = models.info("edsr_baseline_x2")
    crops = fit_calibration(info, PipelineConfig(calibration_crops=3, calibration_side=64))
    assert [tuple(c.shape) for c in crops] == [(1, 3, 64, 64)] * 3
    assert all(0 <= float(c.min()) and float(c.max()) <= 1 for c in crops)
    small = fit_calibration(info, PipelineConfig(calibration_crops=2, calibration_side=64, train_side=48))
    assert [tuple(c.shape) for c in small] == [(1, 3, 24, 24)] * 2          # LR side of a 48-px photo crop
    again = fit_calibration(info, PipelineConfig(calibration_crops=3, calibration_side=64))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))             # seeded


def _args(model, **given):
    return argparse.Namespace(model=model, lr=given.get("lr"), patch_size=given.get("patch_size"))


def test_demo_fine_tuning_defaults_follow_the_model():
    srmd = _args("srmd_x2")
    demo.finetune_defaults(srmd)
    assert (srmd.lr, srmd.patch_size) == (5e-6, 48) == (models.info("srmd_x2")["finetune"]["lr"], 48)
    edsr = _args("edsr_baseline_x2")
    demo.finetune_defaults(edsr)
    assert (edsr.lr, edsr.patch_size) == (2e-4, 32)
    told = _args("srmd_x2", lr=1e-3, patch_size=24)
    demo.finetune_defaults(told)
    assert (told.lr, told.patch_size) == (1e-3, 24)


def test_the_demo_model_is_the_published_srmd_where_its_wheel_is_installed():
    from convfactor.models import published
    assert default_demo_model() == ("srmd_x2" if published.installed("srmd_x2") else "edsr_baseline_x2")
