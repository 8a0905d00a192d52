"""The pipeline settings every whole-model section shares (models, runtimes, int8, frontier).

Full runs time on 2 threads without progress bars; quick (smoke) runs swap the measured-latency
planner for a MACs budget and shrink crops, evaluation and timing so a test takes seconds.
"""
from __future__ import annotations

from convfactor.recipes.pipeline import PipelineConfig

__all__ = ["bench_config", "QUICK_SETTINGS"]

#: what quick mode overrides: tiny training crops, one small held-out photo, few timing repeats, 1 thread
QUICK_SETTINGS = dict(train_side=64, threads=1, eval_side=48, eval_limit=1, speed_repeats=3, calibration_crops=2,
                      calibration_side=12)


def bench_config(quick: bool, **settings) -> PipelineConfig:
    """``settings`` on top of 2 threads and no progress bars; ``quick`` applies :data:`QUICK_SETTINGS`
    and plans by a MACs budget where the settings ask for the latency planner (the default)."""
    merged = {"threads": 2, "progress": False, **settings}
    if quick:
        planner = merged.get("planner", "latency")
        merged.update(QUICK_SETTINGS, planner="budget" if planner == "latency" else planner)
    return PipelineConfig(**merged)
