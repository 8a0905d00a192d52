import pytest
import torch
from torch import nn

from convfactor.utils import eval_mode, torch_threads


def test_torch_threads_restores_the_count_even_after_an_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with torch_threads(target) as n:
            assert n == target == torch.get_num_threads()
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:
        assert n == before
    with pytest.raises(ValueError):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_eval_mode_restores_mixed_flags():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Dropout())
    model.train()
    model[1].eval()                                   # a user's frozen BN stays frozen
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_plain_data_is_json_and_yaml_ready():
    import json

    import numpy as np
    import yaml

    from convfactor.utils import plain_data
    value = {1: (torch.tensor([1.5, 2.0]), np.float32(0.25)), "n": np.int64(3), "t": torch.tensor(4),
             "a": np.arange(2), "nan": float("nan"), "inf": float("inf")}
    out = plain_data(value)
    assert out["1"] == [[1.5, 2.0], 0.25] and out["n"] == 3 and type(out["n"]) is int
    assert out["t"] == 4 and out["a"] == [0, 1] and out["nan"] != out["nan"] and out["inf"] == float("inf")
    assert json.loads(json.dumps(out))["1"] == [[1.5, 2.0], 0.25]
    safe = plain_data(value, nan=None)
    assert safe["nan"] is None and yaml.safe_load(yaml.safe_dump(safe))["n"] == 3


def test_cpu_has_reads_the_flags_line(monkeypatch, tmp_path):
    import builtins

    from convfactor.utils import cpu_has
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : fpu sse avx512f avx512_vnni\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    assert cpu_has("avx512f") and cpu_has("avx_vnni", "avx512_vnni") and not cpu_has("avx512")   # whole flags only
    fake.unlink()
    assert not cpu_has("avx512f")                    # unreadable: False, no exception
