"""The pipeline's data-aware option (issue 15, part 3): the planner scores candidates by their output
error on a mosaic of training-photo patches, never on noise and never on the held-out photos."""
import pytest
import torch

from convfactor import models
from convfactor.recipes import pipeline
from convfactor.recipes.pipeline import PipelineConfig, photo_example, plan_for_speedup


def test_a_bad_error_name_fails_when_the_config_is_made():
    with pytest.raises(ValueError, match="error must be 'kernel'"):
        PipelineConfig(error="outputs")


@pytest.mark.parametrize("name", ["edsr_baseline_x2", "dncnn"])
def test_the_photo_example_is_a_seeded_mosaic_of_training_patches(name):
    info = models.info(name)
    cfg = PipelineConfig(model=name, train_side=96)
    x = photo_example(info, cfg, 24)
    assert x.shape == (1, info["input_shape"][0], 24, 24) and torch.equal(x, photo_example(info, cfg, 24))
    data = pipeline.training_set(info["task"], scale=info.get("scale"), sigma=cfg.sigma, patch_size=12, length=4,
                                 seed=cfg.seed + 7, grey=info["input_shape"][0] == 1, max_side=96)
    assert torch.equal(x[0, :, :12, 12:], data[1][0]) and torch.equal(x[0, :, 12:, :12], data[2][0])
    assert x.std() > 0.02                                 # photo content, not a constant
    odd = photo_example(info, cfg, 25)                    # an odd side is cropped from the 26 px mosaic
    assert odd.shape[-2:] == (25, 25)


def test_the_data_aware_pipeline_plans_on_photos_and_records_the_output_error(monkeypatch):
    seen = {}
    real = pipeline.plan

    def spy(model, example, **kw):
        seen["example"], seen["config"] = example, kw.get("config")
        return real(model, example, **kw)
    monkeypatch.setattr(pipeline, "plan", spy)
    cfg = PipelineConfig(input_size=24, planner="budget", error="output", train_side=64, progress=False)
    info = models.info(cfg.model)
    example, plan_example = pipeline._inputs(cfg, info)
    assert torch.equal(plan_example, photo_example(info, cfg, 24)) and not torch.equal(example, plan_example)
    p, _ = plan_for_speedup(models.get(cfg.model, pretrained=True).eval(), plan_example, cfg, log=lambda *a: None)
    assert seen["config"].error == "output" and p.summary.error_metric == "output"
    assert torch.equal(seen["example"], plan_example)
    kernel = PipelineConfig(input_size=24, planner="budget", train_side=64, progress=False)
    noise, same = pipeline._inputs(kernel, info)
    assert same is noise                                  # the weight proxy keeps planning on the timed noise
