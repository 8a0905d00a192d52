"""The latency planner's decisions on a deterministic fake timer (tests/rank/fake_timer.py)."""
import itertools
import random

import pytest
import torch

from convfactor import models
from convfactor.measure.latency import to_memory_format
from convfactor.rank import LatencyCache, LatencyConfig, plan
from convfactor.rank.latency import Option, choose

from fake_timer import FakeTimer

FAST = dict(methods=("channel_svd", "linear_svd"))


def fast(timer, **settings) -> LatencyConfig:
    """One timed repeat and one end-to-end round: the fake timer is deterministic."""
    return LatencyConfig(timer=timer, repeats=1, e2e_rounds=1, e2e_repeats=1, **settings)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.get("resnet20"), models.default_input("resnet20")


def fake_speedup(model, compressed, x, fmt, timer):
    """Independent end-to-end check: the original in its fastest form vs the plan in its format."""
    ref = min(timer(*to_memory_format(model, (x,), f)) for f in ("contiguous", "channels_last"))
    import copy
    m, inputs = to_memory_format(copy.deepcopy(compressed), (x,), fmt)
    return ref / timer(m, inputs)


@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0])
def test_plan_meets_requested_speedup(resnet, speedup):
    model, x = resnet
    timer = FakeTimer()
    p = plan(model, x, target=f"speedup={speedup}x", latency=fast(timer), **FAST)
    assert p.summary["reachable"]
    assert abs(p.summary["measured_speedup"] / speedup - 1) <= 0.10
    # The fake timer favours channels_last for everything: that is the reference and the plan's format.
    assert p.summary["reference_format"] == "channels_last" and p.memory_format == "channels_last"
    for layer in p.compressed:
        assert layer.factorized_ms < layer.dense_ms
    compressed, _ = p.apply(model, x)
    assert fake_speedup(model, compressed, x, p.memory_format, FakeTimer()) == pytest.approx(
        p.summary["measured_speedup"], rel=1e-6)


def test_more_speed_costs_more_error(resnet):
    model, x = resnet
    errs = [plan(model, x, target=f"speedup={s}x", latency=fast(FakeTimer()), **FAST).summary["rms_kernel_error"]
            for s in (1.5, 3.0)]
    assert errs[0] < errs[1]


def test_dense_is_kept_where_no_candidate_is_faster(resnet):
    model, x = resnet
    # A per-conv overhead far above the arithmetic: splitting a conv in two only adds time.
    timer = FakeTimer(overhead=1.0)
    p = plan(model, x, target="speedup=2x", latency=fast(timer), **FAST)
    assert not p.compressed
    assert all(L.note for L in p.layers)
    assert p.summary["measured_speedup"] >= 1.0
    assert not p.summary["reachable"] and "unreachable" in p.summary["message"]


def test_small_layers_stay_dense_with_moderate_overhead(resnet):
    model, x = resnet
    # The overhead of one extra conv outweighs what factorizing the tiny stem conv and fc can save.
    p = plan(model, x, target="speedup=1.5x", latency=fast(FakeTimer(overhead=2e-4)), **FAST)
    by_name = {L.name: L for L in p.layers}
    assert by_name["conv1"].method is None and by_name["fc"].method is None
    assert "faster" in (by_name["fc"].note or "")
    assert p.compressed


def test_never_slower_than_the_original(resnet):
    model, x = resnet
    # Per layer the candidates look faster, but end to end every factorized piece costs a lot more.
    p = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(e2e_penalty=1.0), max_iter=3), **FAST)
    assert not p.compressed
    assert p.summary["measured_speedup"] == 1.0
    assert "slower" in p.summary["message"]


def test_tightens_when_end_to_end_misses(resnet):
    model, x = resnet
    timer = FakeTimer(e2e_penalty=1e-4)
    p = plan(model, x, target="speedup=2x", latency=fast(timer, max_iter=6), **FAST)
    history = p.summary["history"]
    assert len(history) > 1
    assert history[0]["measured_speedup"] < 1.8              # the first try missed ...
    assert history[-1]["aimed_speedup"] > 2.0                # ... so the planner aimed higher
    assert abs(p.summary["measured_speedup"] / 2.0 - 1) <= 0.10 and p.summary["reachable"]


def test_earlier_tries_aim_a_warm_plan(resnet, tmp_path):
    """Per-layer predictions are optimistic, so a cold plan needs several tries; a second plan from the
    same (cached) table starts from the first one's tries and lands with fewer, still measured."""
    model, x = resnet
    cache = str(tmp_path / "timings.json")
    cold = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(e2e_penalty=1e-4), max_iter=6, cache=cache), **FAST)
    warm = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(e2e_penalty=1e-4), max_iter=6, cache=cache), **FAST)
    assert len(cold.summary["history"]) > 1 and cold.summary["reachable"]
    assert warm.summary["aimed_from_earlier_tries"] == len(cold.summary["history"])
    assert len(warm.summary["history"]) < len(cold.summary["history"]) and warm.summary["reachable"]
    assert warm.summary["history"][0]["aimed_speedup"] > 2.0        # aimed past the request from the start


def test_a_clearly_slower_memory_format_gets_no_layer_table(resnet):
    model, x = resnet
    p = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(cl_speedup=1.5)), **FAST)
    assert list(p.summary["skipped_formats"]) == ["contiguous"] and "50% slower" in p.summary["skipped_formats"]["contiguous"]
    assert set(p.summary["original_ms"]) == {"contiguous", "channels_last"}     # still timed and recorded
    every = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(cl_speedup=1.5), format_slack=None), **FAST)
    close = plan(model, x, target="speedup=2x", latency=fast(FakeTimer(cl_speedup=1.03)), **FAST)
    assert every.summary["skipped_formats"] == {} and close.summary["skipped_formats"] == {}
    with pytest.raises(ValueError, match="format_slack"):
        LatencyConfig(format_slack=-0.1)


def test_cache_reads_the_flat_layout_of_earlier_versions(tmp_path):
    import json
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"k": 1.5}))
    cache = LatencyCache(path)
    assert cache.get("k") == 1.5 and cache.trials == {}
    cache.add_trials("t", [(2.0, 1.8)])
    cache.save()
    assert LatencyCache(path).trials == {"t": [[2.0, 1.8]]} and LatencyCache(path).get("k") == 1.5


def test_model_signature_follows_structure_not_values():
    from convfactor.rank.latency import model_signature
    a, b = models.get("resnet20"), models.get("resnet20")
    with torch.no_grad():
        b.conv1.weight.mul_(3)
    assert model_signature(a) == model_signature(b)
    b.fc = torch.nn.Linear(b.fc.in_features, 7)
    assert model_signature(a) != model_signature(b)


def test_unreachable_target_reports_best_found(resnet):
    model, x = resnet
    p = plan(model, x, target="speedup=40x", latency=fast(FakeTimer()), **FAST)
    assert not p.summary["reachable"]
    assert "unreachable" in p.summary["message"]
    assert 1.0 < p.summary["measured_speedup"] < 36


def test_error_budget_mode(resnet):
    model, x = resnet
    tight = plan(model, x, target="error=0.3", latency=fast(FakeTimer()), **FAST)
    loose = plan(model, x, target="error=0.8", latency=fast(FakeTimer()), **FAST)
    assert tight.summary["rms_kernel_error"] <= 0.3 + 1e-9
    assert loose.summary["rms_kernel_error"] <= 0.8 + 1e-9
    assert loose.summary["measured_speedup"] > tight.summary["measured_speedup"] >= 1.0


def test_cache_avoids_re_timing(resnet, tmp_path):
    model, x = resnet
    path = tmp_path / "timings.json"
    first = FakeTimer()
    p1 = plan(model, x, target="speedup=2x", latency=fast(first, cache=str(path)), **FAST)
    assert path.is_file()
    second = FakeTimer()
    cache = LatencyCache(path)
    p2 = plan(model, x, target="speedup=2x", latency=fast(second, cache=cache), **FAST)
    assert cache.hits > 0 and cache.misses == 0
    # only the end-to-end runs are timed again (the original's per-format times are cached too)
    assert p2.summary["original_ms_cached"] and not p1.summary["original_ms_cached"]
    assert second.calls <= 2 * len(p2.summary["history"]) < first.calls
    # the first plan's tries aim the second: it needs no more tries and lands as well
    assert p2.summary["aimed_from_earlier_tries"] == len(p1.summary["history"]) > 0
    assert len(p2.summary["history"]) <= len(p1.summary["history"])
    assert p2.summary["reachable"] == p1.summary["reachable"]


def test_cache_key_separates_memory_format_and_shape():
    from convfactor.rank.latency import env_key
    a = LatencyCache.key(env_key(2, torch.float32, (1, 16, 32, 32), "contiguous"), "sig")
    b = LatencyCache.key(env_key(2, torch.float32, (1, 16, 32, 32), "channels_last"), "sig")
    c = LatencyCache.key(env_key(2, torch.float32, (2, 16, 32, 32), "contiguous"), "sig")
    d = LatencyCache.key(env_key(1, torch.float32, (1, 16, 32, 32), "contiguous"), "sig")
    e = LatencyCache.key(env_key(2, torch.float64, (1, 16, 32, 32), "contiguous"), "sig")
    assert len({a, b, c, d, e}) == 5


def _brute(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        t = sum(options[l][i].ms for l, i in enumerate(combo))
        e = sum(options[l][i].error ** 2 for l, i in enumerate(combo))
        if t <= budget + 1e-12 and (best is None or e < best):
            best = e
    return best


def test_choose_is_feasible_and_near_optimal():
    rng = random.Random(0)
    for _ in range(30):
        options = []
        for _layer in range(4):
            dense = rng.uniform(1, 3)
            opts = [Option(None, None, dense, 0.0)]
            for r in range(rng.randint(1, 4)):
                opts.append(Option("m", (r + 1,), rng.uniform(0.1, dense), rng.uniform(0.01, 1.0)))
            options.append(opts)
        lo = sum(min(o.ms for o in opts) for opts in options)
        hi = sum(opts[0].ms for opts in options)
        budget = rng.uniform(lo, hi)
        choice, ok = choose(options, time_budget=budget)
        assert ok
        t = sum(options[l][i].ms for l, i in enumerate(choice))
        e = sum(options[l][i].error ** 2 for l, i in enumerate(choice))
        assert t <= budget + 1e-9
        optimum = _brute(options, budget)
        assert e <= optimum * 1.5 + 1e-9
        # no single-layer change lowers the error and still fits
        for l, opts in enumerate(options):
            for i, o in enumerate(opts):
                t2 = t - options[l][choice[l]].ms + o.ms
                e2 = e - options[l][choice[l]].error ** 2 + o.error ** 2
                assert not (t2 <= budget + 1e-9 and e2 < e - 1e-12)
    # an impossible budget: infeasible, fastest everywhere
    opts = [[Option(None, None, 1.0, 0.0), Option("m", (1,), 0.5, 0.3)]] * 2
    choice, ok = choose(opts, time_budget=0.5)
    assert not ok and choice == [1, 1]


def test_any_available_method_is_handled_generically(resnet):
    from convfactor.methods import registry
    from convfactor.rank.latency_search import LatencyCriterion
    model, x = resnet
    names = [n for n in LatencyCriterion.default_methods if n in registry.available()]
    p = plan(model, x, target="speedup=1.5x", op_names=["layer3.*"], latency=fast(FakeTimer(), ratios=(0.2, 0.5)))
    assert {L.name for L in p.layers} == {n for n, _ in model.named_modules()
                                          if n.startswith("layer3.") and n.endswith(("conv1", "conv2"))}
    for L in p.compressed:
        assert L.method in names and L.factorized_ms < L.dense_ms
        assert 0 <= L.error <= 1
    assert p.summary["measured_speedup"] >= 1.0


def test_next_aim_interpolates_between_bracketing_tries():
    from convfactor.rank.latency_search import _next_aim
    hist = [{"aimed_speedup": 2.0, "predicted_speedup": 2.0, "measured_speedup": 1.5},
            {"aimed_speedup": 4.0, "predicted_speedup": 3.9, "measured_speedup": 2.5}]
    aim = _next_aim(hist, 2.0, 4.0, 2.5)
    assert 2.0 < aim < 3.9
    # without a bracket: the last prediction scaled by the miss
    assert _next_aim(hist[:1], 2.0, 2.0, 1.5) == pytest.approx(2.0 * 2.0 / 1.5)
    # a try far faster than asked never sends the next one to the dense model
    fast = [{"aimed_speedup": 2.0, "predicted_speedup": 1.6, "measured_speedup": 4.0}]
    assert _next_aim(fast, 2.0, 2.0, 4.0) > 1.0


def test_a_plan_with_a_measured_environment_saves_as_yaml(tmp_path):
    """environment() holds torch's version object; the plan file must still serialize (regression)."""
    from convfactor.measure.latency import environment
    from convfactor.rank.planfile import Plan
    p = Plan(criterion="latency", target={"speedup": 3.0})
    p.environment = environment(1, batch=1)
    p.save(tmp_path / "p.yaml")
    assert "torch:" in (tmp_path / "p.yaml").read_text()
    assert Plan.load(tmp_path / "p.yaml").environment["torch"] == p.environment["torch"]


def test_onnxruntime_plans_round_ranks_to_its_channel_block(resnet):
    """ORT's CPU convs are blocked by 16 channels (AVX-512) or 8: its plans round ranks to that."""
    from convfactor.measure.backends import OnnxRuntimeBackend
    pytest.importorskip("onnxruntime")
    model, x = resnet
    block = OnnxRuntimeBackend().channel_multiple()
    assert block in (8, 16)
    p = plan(model, x, target="speedup=1.5x", latency=fast(FakeTimer(), backend="onnxruntime"), **FAST)
    assert p.summary["round_to"] == block and p.compressed
    assert all(r % block == 0 for layer in p.compressed for r in layer.ranks)
    eager = plan(model, x, target="speedup=1.5x", latency=fast(FakeTimer()), **FAST)
    assert eager.summary["round_to"] is None


def test_latency_planner_tries_slice_and_rank_pairs_and_the_plan_keeps_them(resnet, tmp_path):
    """ALDS-style candidates: sliced_svd at several slice counts is timed as (slices, rank) pairs; the
    plan records each layer's slices, survives a save/load, and applies them."""
    from convfactor.rank import Plan
    model, x = resnet
    methods = ("channel_svd", "sliced_svd:slices=2", "sliced_svd:slices=4")
    p = plan(model, x, target="speedup=1.5x", latency=fast(FakeTimer()), methods=methods)
    table = p.table()
    sliced = [L for L in p.compressed if L.method == "sliced_svd"]
    assert sliced, table
    assert all(L.options in ({"slices": 2}, {"slices": 4}) for L in sliced)
    assert all(L.options is None for L in p.compressed if L.method == "channel_svd")
    assert "sliced_svd:slices=" in table
    path = tmp_path / "plan.yaml"
    p.save(path)
    again = Plan.load(path)
    assert [(L.method, L.ranks, L.options) for L in again.layers] == [(L.method, L.ranks, L.options) for L in p.layers]
    compressed, _ = again.apply(model, x)
    built = dict(compressed.named_modules())
    for L in sliced:
        assert built[L.name].options["slices"] == L.options["slices"] and list(built[L.name].ranks) == L.ranks


def test_a_plan_layer_with_bad_options_is_refused(tmp_path):
    from convfactor.rank import Plan
    with pytest.raises(ValueError, match="options must be a mapping"):
        Plan.from_dict({"layers": [{"name": "a", "method": "sliced_svd", "ranks": [2], "options": 4}]})
