"""The compatibility matrix (issue 14): third-party architectures x every method.

For each case of tests/compat_cases.py (torchvision, timm and spandrel models, seeded random weights
with no constant tensor left, float64, small inputs) and each method:

* ``full_rank``: every selected layer is factorized at full rank with the model's output within
  1e-6 relative error, or skipped with a stated reason; none is left out of the report; no exception;
  at least one layer is factorized, unless the case lists the method in ``nothing_factorized`` with
  the words of its reasons (then nothing is, for exactly those reasons).
* ``macs_ratio``: one whole-selection rule at ``macs_ratio=0.5`` runs (unreachable layers skipped with
  a reason, at least one factorized as above), every factorized layer meets the ratio, the output is finite, and the result survives
  ``convfactor.save`` / ``convfactor.load`` bit-exactly (onto a base model whose tensors are all NaN).
* ``onnx`` (the cases marked ``export``): the channel-SVD model at 0.5 exports to ONNX and onnxruntime
  agrees with it.

Layers are limited by size (``compat_cases.CHEAP``), and CP / low-rank + sparse run on four small
layers per model (``compat_cases.EXPENSIVE``), to keep the matrix within CI time.  Each model's tests
share one worker (``xdist_group``), so ``make test``'s ``--dist loadgroup`` builds it once.
"""
from __future__ import annotations

import functools

import pytest
import torch

import compat_cases as cc
from convfactor.methods import registry

#: ratio slack for a factorized layer at macs_ratio=0.5: ranks are integers (and basis/tt round)
RATIO_SLACK = 0.05

#: cells failing today because of fixes other work on issue 14 is making; the lead removes these
PENDING: dict[tuple[str, str, str], str] = {}


@functools.lru_cache(maxsize=1)
def built(key: str):
    """The case's (model, example), built once per worker while its cells run (one model at a time)."""
    return cc.build(cc.case(key))


def _cells() -> list:
    cells = []
    for model_case in cc.CASES:
        checks = [(m, c) for m in cc.METHODS for c in ("full_rank", "macs_ratio")]
        checks += [("channel_svd", "onnx")] if model_case.export else []
        for method, check in checks:
            marks = [pytest.mark.xdist_group(model_case.key)]
            reason = PENDING.get((model_case.key, method, check))
            if reason:
                marks.append(pytest.mark.xfail(strict=False, reason=f"pending: {reason}"))
            cells.append(pytest.param(model_case.key, method, check, marks=marks,
                                      id=f"{model_case.key.replace(' ', '_')}-{method}-{check}"))
    return cells


def _accounted_for(outcome: cc.Outcome, model_case: cc.ModelCase, method: str) -> None:
    """Every selected layer is factorized or skipped with a reason, and something is factorized unless
    the case expects nothing for ``method``, for the reasons it lists (all of them, and only them)."""
    assert not outcome.missing, f"selected layers neither factorized nor skipped: {outcome.missing[:5]}"
    blank = [name for name, reason in outcome.reasons.items() if not (reason or "").strip()]
    assert not blank, f"skipped without a reason: {blank[:5]}"
    reasons = sorted(set(outcome.reasons.values()))
    expected = model_case.nothing_factorized.get(method)
    if expected is None:
        assert outcome.factorized, f"nothing factorized ({outcome.skipped} layers skipped): {reasons[:3]}"
    else:
        assert not outcome.factorized, (f"{outcome.factorized} layers factorized, yet the case expects none "
                                        f"({expected}): update compat_cases")
        unexplained = [r for r in reasons if not any(words in r for words in expected)]
        assert not unexplained, f"skipped for reasons the case does not list: {unexplained[:3]}"
        unseen = [words for words in expected if not any(words in r for r in reasons)]
        assert not unseen, f"listed reasons absent from the report: {unseen}; reasons: {reasons[:3]}"


@pytest.mark.parametrize("key, method, check", _cells())
def test_matrix(key, method, check, tmp_path):
    model, example = built(key)
    if check == "full_rank":
        _, _, outcome = cc.run_full_rank(model, example, method)
        _accounted_for(outcome, cc.case(key), method)
        assert outcome.error <= cc.EXACT, f"full rank is not exact: relative output error {outcome.error:.3g}"
    elif check == "macs_ratio":
        compressed, report, outcome = cc.run_macs_ratio(model, example, method, 0.5)
        _accounted_for(outcome, cc.case(key), method)
        with torch.no_grad():
            out = cc.flat_output(compressed(example.clone()))
        assert torch.isfinite(out).all()
        over = [(L.name, round(L.macs_ratio, 3)) for L in report.compressed
                if L.macs_before and L.macs_ratio > 0.5 + RATIO_SLACK]
        assert not over, f"layers above macs_ratio=0.5: {over[:5]}"
        assert cc.round_trip(compressed, model, example, tmp_path / "saved"), "save/load is not bit-exact"
    else:
        compressed, _, _ = cc.run_macs_ratio(model, example, method, 0.5)
        assert cc.onnx_error(compressed, example, tmp_path / "model.onnx") <= 1e-4


def test_every_case_and_method_is_in_the_matrix():
    keys = {p.values[0] for p in _cells()}
    assert keys == {c.key for c in cc.CASES} and len(keys) >= 15
    assert {p.values[1] for p in _cells()} == set(cc.METHODS)
    assert set(cc.METHODS) == set(registry.available())


def test_a_cell_that_factorizes_nothing_fails_unless_its_case_lists_the_reasons():
    """The cell check itself: a report of skips alone is a failure, unless the case expects it."""
    skipped = cc.Outcome(factorized=0, skipped=2, reasons={"a": "m: Conv3d is not supported", "b": "m: no Linear"})
    plain = cc.ModelCase("plain", "x", (1,), "torchvision")
    with pytest.raises(AssertionError, match="nothing factorized"):
        _accounted_for(skipped, plain, "m")
    listed = cc.ModelCase("listed", "x", (1,), "torchvision", nothing_factorized={"m": ("Conv3d", "no Linear")})
    _accounted_for(skipped, listed, "m")
    _accounted_for(cc.Outcome(factorized=1, skipped=2, reasons=skipped.reasons), plain, "m")
    for outcome, case, words in [
            (cc.Outcome(factorized=1, skipped=0), listed, "expects none"),                 # a stale entry
            (skipped, cc.ModelCase("l", "x", (1,), "t", nothing_factorized={"m": ("Conv3d",)}), "does not list"),
            (skipped, cc.ModelCase("l", "x", (1,), "t", nothing_factorized={"m": ("Conv3d", "no Linear", "groups")}),
             "absent from the report"),
            (cc.Outcome(factorized=0, skipped=1, reasons={"a": " "}), listed, "without a reason"),
            (cc.Outcome(factorized=1, missing=["c"]), plain, "neither factorized nor skipped")]:
        with pytest.raises(AssertionError, match=words):
            _accounted_for(outcome, case, "m")


def test_the_cases_list_only_known_methods():
    for model_case in cc.CASES:
        assert set(model_case.nothing_factorized) <= set(cc.METHODS), model_case.key
        assert all(words and all(w.strip() for w in words) for words in model_case.nothing_factorized.values())
