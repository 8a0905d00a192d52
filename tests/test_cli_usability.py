"""Issue 23: what a new user tripped over on the command line.  Configured methods (``name:key=value``)
in compress and in rules, one-line usage errors, ``--version`` / ``python -m convfactor``, compare's
verdict only against a target given, the message for a folder of the user's own files, and a refused
pickle without torch's warning in front of it."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import convfactor
from convfactor import cli
from convfactor.compression.surgery import parse_rule
from convfactor.measure.compare import SpeedComparison
from convfactor.methods import registry

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, command: str) -> str:
    """stderr, checked to be exactly one line ``convfactor COMMAND: error: ...``; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"convfactor {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------ 1. name:key=value in compress and rules
def test_a_configured_method_is_accepted_by_compress_and_by_rules(tmp_path, capsys):
    out = tmp_path / "sliced"
    assert cli.main(["compress", "resnet20", "--method", "sliced_svd:slices=4", "--rank", "2",
                     "--op-names", "layer2.1.conv1", "-o", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())["layers"]
    assert recipe["layer2.1.conv1"]["method"] == "sliced_svd"
    assert recipe["layer2.1.conv1"]["options"]["slices"] == 4
    rule = parse_rule({"method": "sliced_svd:slices=4", "energy": 0.9})
    assert rule.method.name == "sliced_svd" and rule.method.slices == 4
    assert parse_rule({"method": "sliced_svd:slices=4", "slices": 8, "rank": 2}).method.slices == 8   # the key wins
    assert registry.get("cp:form=folded").form == "folded"


def test_a_bad_option_reads_the_same_in_compress_rules_and_plan(tmp_path, capsys):
    message = "sliced_svd: slices must be a positive int, got 0"
    assert cli.main(["plan", "resnet20", "--method", "sliced_svd:slices=0", "--target", "macs=50%",
                     "-o", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"convfactor plan: error: {message}"
    assert cli.main(["compress", "resnet20", "--method", "sliced_svd:slices=0", "--macs-ratio", "0.5",
                     "-o", str(tmp_path / "a")]) == 2
    assert _one_line_error(capsys, "compress") == f"convfactor compress: error: {message}"
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"method": "sliced_svd:slices=0", "macs_ratio": 0.5}]))
    assert cli.main(["compress", "resnet20", "--rules", str(rules), "-o", str(tmp_path / "b")]) == 2
    assert _one_line_error(capsys, "compress") == f"convfactor compress: error: rule 0: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.json"]          # nothing written
    with pytest.raises(ValueError, match="unknown option"):
        registry.get("sliced_svd:slicez=4")


# ------------------------------------------------------------------ 5. image-facing convs stay dense by default
def test_plain_compress_keeps_image_facing_convs_dense_unless_asked(tmp_path, capsys):
    """EDSR's tail.1 (64 -> 3 channels) was factorized at rank 1 (output error 0.71) by a plain
    --macs-ratio 0.5; it is now skipped with its reason, and --include-image-layers factorizes it."""
    common = ["compress", "edsr_baseline_x2", "--input-size", "1x3x16x16", "--method", "channel_svd",
              "--macs-ratio", "0.5", "--op-names", "tail.*"]
    for extra, out in (([], "default"), (["--include-image-layers"], "all")):
        assert cli.main([*common, *extra, "--no-merge", "-o", str(tmp_path / out)]) == 0
    printed = capsys.readouterr().out
    tail = next(line for line in printed.splitlines() if line.startswith("tail.1 "))
    assert "skipped: image-facing" in tail and "--include-image-layers" in tail
    layers = {out: json.loads((tmp_path / out / "report.json").read_text())["layers"] for out in ("default", "all")}
    skipped = {out: {L["name"]: L["skipped"] for L in layers[out]} for out in layers}
    assert skipped["default"]["tail.0.0"] is None and "image-facing" in skipped["default"]["tail.1"]
    assert skipped["all"] == {"tail.0.0": None, "tail.1": None}
    assert "tail.1" in json.loads((tmp_path / "all" / "recipe.json").read_text())["layers"]
    assert "tail.1" not in json.loads((tmp_path / "default" / "recipe.json").read_text())["layers"]


# ------------------------------------------------------------------ 3. --version, __version__, python -m
def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_version_flag_attribute_and_python_dash_m():
    expected = importlib.metadata.version("convfactor")
    assert convfactor.__version__ == expected
    done = _run("-m", "convfactor", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"convfactor {expected}", done.stderr
    done = _run("-m", "convfactor", "compress", "resnet20", "--rank", "abc", "-o", "unused")
    assert done.returncode == 2 and done.stderr.startswith("convfactor compress: error:"), done.stderr


def test_version_falls_back_to_pyproject_without_package_metadata():
    pyproject = (ROOT / "pyproject.toml").read_text()
    expected = next(line.split('"')[1] for line in pyproject.splitlines() if line.startswith("version"))
    code = ("import importlib.metadata as m\n"
            "def missing(name):\n    raise m.PackageNotFoundError(name)\n"
            "m.version = missing\nimport convfactor\nprint(convfactor.__version__)\n")
    done = _run("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr


# ------------------------------------------------------------------ 6. compare: a verdict only against a target
def _comparison(speedup: float, interval: tuple[float, float]) -> SpeedComparison:
    form = {"median_ms": 1.0}
    return SpeedComparison(original={"contiguous": form}, compressed={"contiguous": form}, original_best="contiguous",
                           compressed_best="contiguous", speedup=speedup, same_form={}, interval=interval, rounds=3)


@pytest.mark.parametrize("args, speedup, interval, wanted, unwanted", [
    ([], 1.5, (1.4, 1.6), None, "target"),
    (["--target", "2x"], 1.5, (1.4, 1.6), "TARGET MISSED", None),
    (["--target", "speedup=1.2"], 1.5, (1.4, 1.6), "target met", None),
    ([], 0.5, (0.4, 0.6), "SLOWER THAN THE ORIGINAL", "target"),
])
def test_compare_prints_a_verdict_only_against_a_target_given(monkeypatch, capsys, args, speedup, interval, wanted,
                                                              unwanted):
    monkeypatch.setattr("convfactor.commands.compare.compare_speed",
                        lambda *a, **k: _comparison(speedup, interval))
    assert cli.main(["compare", "resnet20", "resnet20", "--malloc", "default", *args]) == 0
    printed = capsys.readouterr().out
    if wanted:
        assert wanted in printed
    if unwanted:
        assert unwanted not in printed.lower()


def test_compare_refuses_a_target_that_is_no_speedup(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "resnet20", "resnet20", "--target", "macs=50%"])
    assert exit_.value.code == 2
    _one_line_error(capsys, "compare")


# ------------------------------------------------------------------ 7. -o into a folder of the user's files
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_the_users_files_is_refused_in_one_consistent_message(tmp_path, capsys, overwrite):
    theirs = tmp_path / "photos"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_bytes(b"not yours")
    before = _snapshot(tmp_path)
    assert cli.main(["compress", "resnet20", "--method", "channel_svd", "--rank", "2", *overwrite,
                     "-o", str(theirs)]) == 2
    line = _one_line_error(capsys, "compress")
    assert "not a convfactor model directory" in line and "new or empty directory" in line
    assert "pass --overwrite" not in line
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ 8. argparse errors in one line
@pytest.mark.parametrize("command, argv", [
    ("plan", ["plan", "resnet20", "--backend", "nosuch", "-o", "p.yaml"]),
    ("compress", ["compress", "resnet20", "--method", "channel_svd", "--rank", "abc", "-o", "out"]),
    ("compress", ["compress", "resnet20", "--method", "channel_svd", "--rank", "2", "--energy", "0.9", "-o", "out"]),
    ("compress", ["compress", "resnet20"]),
])
def test_usage_errors_are_one_line_with_a_pointer_to_help(tmp_path, monkeypatch, capsys, command, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert _one_line_error(capsys, command).endswith(f"(see convfactor {command} --help)")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 9. a refused pickle, without torch's warning
def test_a_refused_pickle_is_one_line_without_a_warning(tmp_path, capsys):
    import pickle
    import numpy as np
    file = tmp_path / "weights.pkl"
    file.write_bytes(pickle.dumps({"conv1.weight": np.zeros(3)}, protocol=4))   # torch warns about protocol 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["inspect", "resnet20", "--weights", str(file)]) == 2
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert "--trust-pickle" in _one_line_error(capsys, "inspect")


def test_a_factory_in_the_current_folder_says_how_to_import_it(tmp_path, monkeypatch, capsys):
    """issue 23: `mymodule:factory` failed from the module's own folder with no word about PYTHONPATH."""
    (tmp_path / "mymod_cf_hint.py").write_text("from torch import nn\ndef make():\n    return nn.Conv2d(3, 4, 3)\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", "mymod_cf_hint:make", "--input-size", "1x3x8x8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mymod_cf_hint is in the current folder" in err[0] and "PYTHONPATH=." in err[0]
