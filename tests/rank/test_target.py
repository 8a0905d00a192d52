"""The typed target and the speed-up band: parsed once at the edge, validated once, numbers after."""
import pytest
from hypothesis import given, strategies as st

from convfactor.rank import LatencyConfig, SpeedupBand, Target


# moved from tests/recipes/test_pipeline.py (the band arithmetic moved from the pipeline's planner_target)
@given(st.floats(1.0, 10.0), st.floats(0.0, 0.5))
def test_accepted_band_starts_half_a_margin_above_the_request(speedup, margin):
    band = SpeedupBand.at_least(speedup, margin)
    aim, lo, hi = band.aim, band.low, band.high
    assert lo == pytest.approx(speedup * (1 + margin / 2))
    assert hi == pytest.approx(speedup * (1 + 1.5 * margin))
    assert lo >= speedup and lo <= aim <= hi


@pytest.mark.parametrize("speedup, margin", [(0.5, 0.1), (3.0, -0.1), (3.0, 1.0)])
def test_bad_target_fails(speedup, margin):
    with pytest.raises(ValueError):
        SpeedupBand.at_least(speedup, margin)


def test_the_latency_config_picks_the_band():
    assert LatencyConfig(margin=0.12).speedup_band(3.0) == SpeedupBand.at_least(3.0, 0.12)
    plain = LatencyConfig(band=0.1).speedup_band(2.0)
    assert (plain.request, plain.aim) == (2.0, 2.0)
    assert plain.low == pytest.approx(1.8) and plain.high == pytest.approx(2.2)
    assert 1.9 in plain and 2.3 not in plain
    with pytest.raises(ValueError):
        LatencyConfig(margin=1.5)
    with pytest.raises(ValueError):
        LatencyConfig(formats=("sideways",))


@pytest.mark.parametrize("text, kind, value", [
    ("speedup=3x", "speedup", 3.0), ("speedup=2.5", "speedup", 2.5), ({"speedup": 3}, "speedup", 3.0),
    ("macs=40%", "macs", 0.4), ("params=4x", "params", 0.25), ({"macs": 0.5}, "macs", 0.5),
    ("error=0.2", "error", 0.2), ("energy=0.9", "energy", 0.9), ("rank=8", "rank", 8), ({"rank": 4}, "rank", 4),
    (" Speedup = 2x ", "speedup", 2.0),
])
def test_parse(text, kind, value):
    t = Target.parse(text)
    assert t == Target(kind, value)
    assert t.as_dict() == {kind: value} and isinstance(t.value, int) == (kind == "rank")
    assert Target.parse(t) is t


@pytest.mark.parametrize("bad", ["speed=3x", "macs40", "macs=0%", "macs=150%", "speedup=0.5x", "speedup=fast",
                                 "error=0", "energy=1.5", "rank=0", "rank=2.5", {"macs": 0.4, "params": 0.4}])
def test_bad_targets_fail_when_parsed(bad):
    with pytest.raises(ValueError):
        Target.parse(bad)


def test_a_target_is_validated_when_built():
    assert Target.parse(None) is None
    with pytest.raises(ValueError, match=">= 1"):
        Target("speedup", 0.9)
    with pytest.raises(ValueError, match="unknown target"):
        Target("latency", 2.0)
    with pytest.raises(ValueError):
        Target("rank", True)
