"""The `models` bench section in its quick configuration: one EDSR row with every column filled."""
import re

from convfactor import models
from benchmarks import models as section


def test_quick_models_section_has_a_measured_row():
    text = section.SECTION.run(quick=True)
    assert text.startswith(f"## {section.TITLE}")
    assert "edsr_baseline_x2" in models.pretrained_names()
    row = next(line for line in text.splitlines() if line.startswith("| edsr_baseline_x2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 12
    speed = float(re.search(r"\*\*([0-9.]+)x\*\*", row).group(1))
    assert speed > 0
    assert 0 < float(cells[4]) < 1 and 0 < float(cells[5]) < 1           # MACs and params ratios
    assert "bicubic" in cells[10] and "2 steps" in cells[11]
    assert "mean nothing" in text
    if "srmd_x2" in models.pretrained_names():              # the published SRMD row: OpenVINO plan, data-aware fit
        srmd = next(line for line in text.splitlines() if line.startswith("| srmd_x2 |"))
        assert "on openvino, data-aware fit" in srmd and "1 steps" in srmd
        assert "srmd_x2, the same models on the other back-ends" in text
