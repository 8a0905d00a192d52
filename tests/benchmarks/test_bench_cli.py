"""Smoke test of `python -m benchmarks --quick` (every existing section) and of the bench sections of issue 6;
`convfactor bench` only points there."""
import os
import subprocess
import sys
from pathlib import Path

import benchmarks as bench
from benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_writes_every_section(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    rc = main(["--quick", "--threads", "1", "-o", str(out)])
    text = out.read_text()
    assert rc == 0, text
    assert text.startswith("# convfactor benchmarks") and "Quick mode" in text and "threads | 1" in text
    names = [n for n in bench.available() if n not in bench.DEVICE_SECTIONS]     # a GPU section runs when named
    assert text.count("\n## ") >= len(names)
    for name in names:
        assert f"section `{name}`" in text
    assert "This section failed" not in text
    if "peers" in bench.available():
        assert "TensorLy parafac (pytorch)" in text and "FactorizedConv.from_conv" in text
    assert not list(tmp_path.glob(".BENCHMARKS.md*"))                  # written atomically, no temporary left


def test_bench_selected_sections_and_errors(tmp_path, capsys):
    out = tmp_path / "b.md"
    assert main(["--quick", "--threads", "1", "--sections", "im2col", "-o", str(out)]) == 0
    text = out.read_text()
    assert "## im2col + GEMM vs native convolution" in text and text.count("\n## ") == 1
    assert "| 16->16 3x3 @16x16 |" in text and "reproduced" in text or "refuted" in text
    assert main(["--sections", "nope", "-o", str(tmp_path / "c.md")]) == 2
    assert not (tmp_path / "c.md").exists()
    assert main(["--experiment", "nope"]) == 2
    assert main(["--list"]) == 0
    assert "im2col" in capsys.readouterr().out


def test_failing_section_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    broken = bench.Section("broken", "Broken", measure=lambda quick: 1 / 0, render=str)
    monkeypatch.setattr(bench, "available", lambda: ["broken"])
    monkeypatch.setattr(bench, "load_section", lambda name: broken)
    out = tmp_path / "b.md"
    assert main(["--quick", "-o", str(out)]) == 1
    assert "## Broken" in out.read_text() and "ZeroDivisionError" in out.read_text()


def test_one_experiment(tmp_path):
    from benchmarks import experiments
    out = tmp_path / "e.md"
    assert main(["--quick", "--threads", "1", "--experiment", "lebedev_cp", "-o", str(out)]) == 0
    text = out.read_text()
    assert "experiments:lebedev_cp" in text and "### Lebedev et al." in text
    assert set(experiments.NAMES) >= {"lebedev_cp", "blog_spatial_svd"}


def test_digits_data_is_seeded_and_split():
    import pytest
    pytest.importorskip("sklearn")
    from benchmarks.experiments import digits_data
    (xa, ya), (xt, yt) = digits_data()
    (xb, yb), _ = digits_data()
    assert xa.shape[1:] == (3, 8, 8) and len(ya) + len(yt) == 1797 and len(ya) == int(0.8 * 1797)
    assert bool((ya == yb).all()) and float(xa.min()) >= -1 and float(xa.max()) <= 1


def test_update_replaces_only_the_named_sections(tmp_path, monkeypatch):
    runs = {"alpha": 0, "beta": 0}

    def section(name):
        def measure(quick):
            runs[name] += 1
            return runs[name]
        return bench.Section(name, name.title(), measure, lambda n: f"## {name.title()}\n\n{name} run {n}\n")
    fakes = {n: section(n) for n in runs}
    monkeypatch.setattr(bench, "SECTIONS", ["alpha", "beta"])
    monkeypatch.setattr(bench, "available", lambda: ["alpha", "beta"])
    monkeypatch.setattr(bench, "load_section", lambda name: fakes[name])
    out = tmp_path / "B.md"
    assert main(["--quick", "-o", str(out)]) == 0
    first = out.read_text()
    assert "alpha run 1" in first and "beta run 1" in first
    assert main(["--update", "--sections", "beta", "-o", str(out)]) == 0
    second = out.read_text()
    from benchmarks.runner import split_sections
    old, new = split_sections(first), split_sections(second)
    assert new["alpha"] == old["alpha"]                                  # kept byte for byte
    assert "beta run 2" in new["beta"] and "beta run 1" not in second
    assert second.index("## Alpha") < second.index("## Beta") and "re-run by `python -m benchmarks --update`" in second
    assert runs == {"alpha": 1, "beta": 2}
    # a bad --update fails before running anything
    assert main(["--update", "-o", str(out)]) == 2                     # no --sections
    assert main(["--update", "--sections", "beta", "-o", str(tmp_path / "none.md")]) == 2
    assert main(["--update", "--sections", "beta", "--experiment", "lebedev_cp", "-o", str(out)]) == 2
    assert runs == {"alpha": 1, "beta": 2} and out.read_text() == second


def test_update_dates_old_style_stamps_from_the_header():
    from benchmarks.runner import _dated, split_sections
    doc = ("# convfactor benchmarks\n\nWritten by `convfactor bench` on 2026-11-22 04:03 UTC.\n\n| | |\n|---|---|\n"
           "| cpu | Some CPU |\n\n## A\n\nbody\n\n_(section `a`: 1.5 s)_\n")
    section = split_sections(doc)["a"]
    assert _dated(section, doc).endswith("_(section `a`: 1.5 s; 2026-11-22 04:03 UTC; Some CPU)_\n")
    assert _dated(_dated(section, doc), doc) == _dated(section, doc)


def test_backend_goes_to_the_sections_that_take_it(tmp_path, monkeypatch):
    """``--backend`` reaches a section's ``measure(quick, backends=...)``; an eager-only section named
    with it is refused before anything is written; without --sections only the sections taking it run."""
    seen = {}
    takes = bench.Section("takes", "Takes", measure=lambda quick, backends: seen.update(b=backends) or backends,
                          render=lambda b: f"## Takes\n\n{list(b)}\n", backends=("torch", "onnxruntime"))
    eager = bench.Section("eager", "Eager", measure=lambda quick: seen.setdefault("eager", True),
                          render=lambda _: "## Eager\n")
    sections = {"takes": takes, "eager": eager}
    monkeypatch.setattr(bench, "available", lambda: list(sections))
    monkeypatch.setattr(bench, "load_section", lambda name: sections[name])
    out = tmp_path / "b.md"
    assert main(["--quick", "--malloc", "retain", "--backend", "onnxruntime", "-o", str(out)]) == 0
    assert seen == {"b": ("onnxruntime",)} and "## Eager" not in out.read_text()
    assert main(["--quick", "--malloc", "retain", "--sections", "eager", "--backend", "torch",
                 "-o", str(tmp_path / "c.md")]) == 2
    assert not (tmp_path / "c.md").exists() and "eager" not in seen
    assert main(["--quick", "--malloc", "retain", "--sections", "takes", "-o", str(tmp_path / "d.md")]) == 0
    assert "['torch', 'onnxruntime']" in (tmp_path / "d.md").read_text()          # the section's own default
    assert main(["--experiment", "lebedev_cp", "--backend", "torch", "--malloc", "retain"]) == 2


def _clean_env(**extra) -> dict[str, str]:
    """This environment without a preload or re-exec guard inherited from a CLI that re-ran itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "CONVFACTOR_ALLOCATOR_REEXEC")}
    return {**env, **extra}


def test_python_m_benchmarks_runs_from_the_checkout_under_the_fast_allocator(tmp_path):
    """The real command line, as `make bench` runs it: `--malloc auto` re-runs it under tcmalloc (else
    jemalloc) when one is installed, and the file records what the figures ran under."""
    from convfactor.measure.allocator import fast_allocator
    out = tmp_path / "B.md"
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--sections", "im2col",
                          "-o", str(out)], cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "Written by `python -m benchmarks --quick`" in text and "## im2col + GEMM vs native convolution" in text
    found = fast_allocator()
    assert f"| malloc | {found[0] if found else 'retain'} |" in text


def test_convfactor_bench_points_to_python_m_benchmarks(tmp_path, capsys):
    """One line, exit 2, whatever the old options; nothing run or written, sys.path untouched."""
    from convfactor.cli import main as cli_main
    path = list(sys.path)
    out = tmp_path / "B.md"
    for argv in (["bench"], ["bench", "--quick", "--sections", "im2col", "-o", str(out)],
                 ["bench", "--backend", "onnxruntime", "--backend", "torch", "--malloc", "retain", "--update"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "python -m benchmarks" in err and "make bench" in err
    assert sys.path == path and not out.exists()


def test_convfactor_bench_from_an_installed_copy_without_a_checkout(tmp_path):
    """The package copied alone (as a wheel installs it, no benchmarks/ beside it) says the same line."""
    import shutil

    import convfactor
    site = tmp_path / "site"
    shutil.copytree(Path(convfactor.__file__).parent, site / "convfactor",
                    ignore=shutil.ignore_patterns("__pycache__", "weights"))
    env = _clean_env(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import convfactor; print(convfactor.__file__)"], cwd=site,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "convfactor" / "__init__.py")
    res = subprocess.run([sys.executable, "-m", "convfactor.cli", "bench", "--quick", "-o", "B.md"], cwd=site,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "python -m benchmarks" in res.stderr
    assert not (site / "B.md").exists()


def test_a_full_run_keeps_the_gpu_sections_it_cannot_measure(tmp_path, monkeypatch):
    cpu = bench.Section("cpu_one", "CPU one", measure=lambda quick: "cpu figures", render=lambda d: f"## CPU one\n\n{d}")
    monkeypatch.setattr(bench, "available", lambda: ["cpu_one", "cuda"])
    monkeypatch.setattr(bench, "load_section", lambda name: cpu if name == "cpu_one" else 1 / 0)
    out = tmp_path / "b.md"
    out.write_text("# convfactor benchmarks\n\n## GPU\n\nH100 figures\n\n_(section `cuda`: 12.0 s; 2026-12-06 11:00 UTC; H100)_\n")
    assert main(["--quick", "-o", str(out)]) == 0
    text = out.read_text()
    assert "cpu figures" in text and "H100 figures" in text and text.index("cpu figures") < text.index("H100 figures")
