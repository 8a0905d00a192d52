"""The CLI turns a user's mistake into one line and exit 2, but never hides a bug behind it."""
import pytest

from convfactor import cli
from convfactor.utils import UnknownName


def test_unknown_model_is_one_line_and_exit_2(capsys):
    assert cli.main(["inspect", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convfactor inspect: error: unknown model 'no_such_model'")


def test_a_keyerror_from_a_bug_is_not_reported_as_a_user_error(monkeypatch):
    def broken(args):
        return {}["missing"]                       # a programming error, not bad input
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["inspect"].set_defaults(_run=broken)
    with pytest.raises(KeyError):
        cli.main(["inspect", "resnet20"])


def test_unknown_name_reads_without_quotes():
    assert str(UnknownName("unknown model 'x'")) == "unknown model 'x'"
    assert isinstance(UnknownName("x"), KeyError)
