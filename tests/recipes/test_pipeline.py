"""The demo pipeline (plan -> compress -> fine-tune -> measure).  Its speed-up band is tested with
the planner, in tests/rank/test_target.py."""
import json

from convfactor.data.images import builtin_images
from convfactor.measure.quality import evaluate_sr
from convfactor.recipes.pipeline import PipelineConfig, PipelineResult, compress_finetune_measure, summary_rows
from convfactor.utils import torch_threads


def test_the_pipeline_returns_a_typed_result_measured_by_the_one_evaluation_path():
    cfg = PipelineConfig(input_size=24, steps=2, batch_size=2, patch_size=16, eval_side=48, eval_limit=2,
                         planner="fixed", threads=1, speed_repeats=3, train_side=64, progress=False,
                         report_backends=("torch", "onnxruntime", "openvino"))
    res = compress_finetune_measure(cfg, log=lambda *a: None)
    assert isinstance(res, PipelineResult) and res.task == "sr" and res.scale == 2
    assert [h["step"] for h in res.finetune_history] == [1, 2] and res.timings_s.finetune > 0
    assert res.params.compressed < res.params.original and 0 < res.macs.ratio < 1
    images = builtin_images("test", max_side=48, limit=2)
    with torch_threads(1):       # the same numbers as measure.quality gives for the same models and photos
        assert res.quality["original"] == evaluate_sr(res.original, images, 2)
        assert res.quality["compressed"] == evaluate_sr(res.compressed, images, 2)
        assert res.quality["compressed_before_finetune"] == evaluate_sr(res.before_finetune, images, 2)
    rows = summary_rows(res)
    assert [r["label"] for r in rows] == ["original", "compressed, before fine-tuning", "compressed + fine-tuned",
                                          "bicubic"]
    assert rows[2]["psnr"] == res.quality["compressed"]["psnr"] and rows[2]["params"] == res.params.compressed
    assert rows[3]["psnr"] == res.quality["original"]["bicubic_psnr"]
    figures = json.loads(json.dumps(res.to_dict()))           # JSON-able, no models or tensors
    assert figures["params"] == {"original": res.params.original, "compressed": res.params.compressed}
    assert figures["config"]["model"] == "edsr_baseline_x2" and figures["speed"]["speedup"] == res.speed.speedup
