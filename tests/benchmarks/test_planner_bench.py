from benchmarks import planner


def test_planner_bench_quick_runs():
    out = planner.SECTION.run(quick=True)
    assert out.startswith(f"## {planner.TITLE}")
    assert "quick mode" in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet20") or line.startswith("| edsr")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # measured speed-ups are numbers, and the planner never hands back a slower model
        assert float(cells[3].rstrip("x")) >= 1.0
        float(cells[4].rstrip("x"))
