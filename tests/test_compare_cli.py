"""`convfactor compare`: two models side by side per back-end, each speed-up with its interval."""
import importlib.util

from convfactor import cli


def test_compare_prints_each_backend_with_its_interval(tmp_path, capsys):
    out = tmp_path / "r20"
    assert cli.main(["compress", "resnet20", "--method", "channel_svd", "--macs-ratio", "0.5", "-o", str(out)]) == 0
    capsys.readouterr()
    backends = ["torch"] + (["onnxruntime"] if importlib.util.find_spec("onnxruntime") else [])   # torch alone without it
    assert cli.main(["compare", "resnet20", str(out), "--backend", *backends, "--threads", "1",
                     "--rounds", "1", "--max-rounds", "1"]) == 0
    printed = capsys.readouterr().out
    for backend in backends:
        line = next(l for l in printed.splitlines() if l.startswith(backend))
        assert "speed-up" in line and "95% interval" in line and "MACs / 2" in line


def test_compare_rejects_bad_rounds_before_timing(tmp_path, capsys):
    assert cli.main(["compare", "resnet20", "resnet20", "--rounds", "3", "--max-rounds", "2"]) == 2
    assert "--max-rounds" in capsys.readouterr().err
