"""Quick modes of the issue-7 benchmark sections (TT-Linear, data-aware fitting, low-rank + sparse)."""
import pytest

from benchmarks import SECTIONS, load_section


@pytest.mark.parametrize("name", ["tt", "data_aware", "lowrank_sparse"])
def test_quick_section_runs(name):
    assert name in SECTIONS
    section = load_section(name)
    assert section.title
    text = section.run(quick=True)
    assert text.startswith(f"## {section.title}")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 2                      # a header and at least one measured row
    assert "nan" not in text.lower()


def test_data_aware_quick_run_beats_weight_only():
    text = load_section("data_aware").run(quick=True)
    ratios = [float(line.split("|")[6]) for line in text.splitlines()
              if line.startswith("| ") and "| data-aware |" in line]
    assert ratios and all(r < 1 for r in ratios)
