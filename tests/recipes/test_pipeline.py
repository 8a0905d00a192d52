"""The pipeline's speed-up target: the planner must accept only plans measuring above the request."""
import pytest
from hypothesis import given, strategies as st

from convfactor.recipes.pipeline import planner_target


@given(st.floats(1.0, 10.0), st.floats(0.0, 0.5))
def test_accepted_band_starts_half_a_margin_above_the_request(speedup, margin):
    aim, band = planner_target(speedup, margin)
    lo, hi = aim * (1 - band), aim * (1 + band)
    assert lo == pytest.approx(speedup * (1 + margin / 2))
    assert hi == pytest.approx(speedup * (1 + 1.5 * margin))
    assert lo >= speedup and lo <= aim <= hi


@pytest.mark.parametrize("speedup, margin", [(0.5, 0.1), (3.0, -0.1), (3.0, 1.0)])
def test_bad_target_fails(speedup, margin):
    with pytest.raises(ValueError):
        planner_target(speedup, margin)
