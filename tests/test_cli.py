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


def test_the_allocator_peek_matches_the_parser():
    """The pre-import peek at ``--malloc`` agrees with argparse: exactly the timing commands take it,
    and it reads ``auto`` (the default) the way argparse will."""
    from convfactor import cli
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    with_malloc = {name for name, p in sub.choices.items() if any(a.dest == "malloc" for a in p._actions)}
    assert with_malloc == set(cli.TIMING_COMMANDS)
    peek = cli._wants_fast_allocator
    assert peek(["plan", "resnet20", "-o", "x"]) and peek(["demo", "--malloc", "auto"]) and peek(["bench", "--malloc=auto"])
    assert not peek(["plan", "resnet20", "--malloc", "retain"]) and not peek(["demo", "--malloc=default"])
    assert not peek(["compress", "resnet20"]) and not peek(["plan", "--help"]) and not peek([])
