"""The CP bench sections run in quick mode and return a Markdown section with tables."""
import re

from benchmarks import cp_peers, factorize_speed, load_section


def _tables(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


def test_cp_peers_quick():
    assert load_section("cp_peers") is cp_peers.SECTION
    md = cp_peers.SECTION.run(quick=True)
    assert md.startswith(f"## {cp_peers.TITLE}")
    rows = _tables(md)
    assert any("convfactor cp" in r for r in rows) and any("TensorLy parafac" in r for r in rows)
    # every data row carries finite numbers: time, error, RSS
    for r in rows:
        if "convfactor cp" in r or "TensorLy parafac" in r:
            cells = [c.strip() for c in r.strip("|").split("|")]
            seconds, error = float(cells[3]), float(cells[4])
            assert seconds > 0 and 0 <= error < 1.5


def test_factorize_speed_quick():
    assert load_section("factorize_speed") is factorize_speed.SECTION
    md = factorize_speed.SECTION.run(quick=True)
    assert md.startswith(f"## {factorize_speed.TITLE}")
    rows = [r for r in _tables(md) if re.match(r"\| (channel_svd|cp|cp, n_iter=25) \|", r)]
    assert len(rows) == 3
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert int(cells[1]) == 5                      # all five kernels factorized


def test_resnet50_has_53_convs():
    convs = factorize_speed.resnet50_convs()
    assert len(convs) == 53
    # 16 bottlenecks x 3 + 4 downsamples + stem; the last stage runs at 7x7 after its stride-2 conv
    assert sum(c["name"].endswith("downsample.0") for c in convs) == 4
    assert convs[-1]["hw"] == 7 and convs[-1]["cin"] == 512 and convs[-1]["cout"] == 2048
