"""The cuda section (issue 22): where no GPU is, it says so and keeps no figures; its logic, run on the CPU in
quick mode, times each plan in fp32 and bf16 against its own dense model."""
import torch

from benchmarks import cuda, load_section


def test_without_a_gpu_the_section_says_it_was_not_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = load_section("cuda").run(quick=True)
    assert "Not measured: no CUDA device" in text and "x**" not in text


def test_quick_on_the_cpu_times_every_plan_in_both_precisions():
    res = cuda.measure(quick=True, device="cpu")
    assert [(r.model, r.plan, r.precision) for r in res.rows] == [
        ("srmd_x2", "dense", "bf16 vs fp32"), ("srmd_x2", "channel_svd rank 8", "fp32"),
        ("srmd_x2", "channel_svd rank 8", "bf16"), ("rrdbnet_x4", "dense", "bf16 vs fp32"),
        ("rrdbnet_x4", "channel_svd at 0.5 of each conv's MACs", "fp32"),
        ("rrdbnet_x4", "channel_svd at 0.5 of each conv's MACs", "bf16")]
    for r in res.rows:
        assert r.comparison.speedup > 0 and (r.plan == "dense") == (r.comparison.macs_reduction in (None, 1.0))
    assert "| srmd_x2 | channel_svd rank 8 | bf16 |" in cuda.render(res)
