import json

import pytest

from convfactor.cli import main


def test_help_for_every_command(capsys):
    from convfactor.cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"inspect", "compress"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_inspect_prints_table(capsys):
    assert main(["inspect", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "kappa" in out


def test_compress_writes_and_reloads(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.5", "-o", str(out)]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["layers"] and recipe["metadata"]["model"] == "resnet20"
    assert main(["inspect", str(out)]) == 0


def test_compress_bad_output_fails_before_work(tmp_path, capsys):
    rc = main(["compress", "resnet20", "--method", "channel_svd", "--rank", "4", "-o", str(tmp_path / "no" / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_compress_bad_rank(tmp_path, capsys):
    rc = main(["compress", "resnet20", "--method", "channel_svd", "--rank", "0", "-o", str(tmp_path / "x")])
    assert rc == 2 and not (tmp_path / "x").exists()
