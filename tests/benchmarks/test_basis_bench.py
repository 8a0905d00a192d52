"""The filter-basis bench section runs in its quick (smoke) configuration and has its tables."""
from benchmarks import basis, load_section
from convfactor.methods.basis import CONCRETE_IMPLS


def test_quick_run_produces_both_tables():
    assert load_section("basis") is basis.SECTION and basis.TITLE
    text = basis.SECTION.run(quick=True)
    assert text.startswith(f"## {basis.TITLE}")
    assert "### Forward implementations" in text and "### Speed-up vs the fastest dense conv" in text
    for impl in CONCRETE_IMPLS + ("auto",):
        assert f"{impl} NCHW / CL ms" in text
    # part 2 has one row per s (1, 2, 4, 8 all divide the 16 quick channels), each with an efficiency
    rows = [line for line in text.splitlines() if line.startswith("| 16 | 12x12 | 1 | 4x |")]
    assert [int(r.split("|")[5]) for r in rows] == list(basis.SPLITS)
    assert all(float(r.split("|")[-2]) > 0 for r in rows)


def test_m_for_meets_the_mac_budget_and_is_largest():
    from convfactor.spec.convspec import ConvSpec
    from convfactor.methods.basis import Basis
    from torch import nn
    spec = ConvSpec.from_module(nn.Conv2d(64, 64, 3, padding=1))
    for s in basis.SPLITS:
        m = basis._m_for(spec, s, 4, 48)
        dense = spec.dense_macs((48, 48))
        assert Basis(s).cost(spec, (m,), (48, 48)).macs <= dense / 4 < Basis(s).cost(spec, (m + 1,), (48, 48)).macs
