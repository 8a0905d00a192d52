"""A parsed rule is typed: a selector, a validated target and a configured method (looked up once)."""
import pytest
import torch
from torch import nn

import convfactor
from convfactor.compression.surgery import LayerTarget, Rule, Selector, configure, parse_rules, select
from convfactor.methods import registry
from convfactor.methods.data_aware import DataAwareSettings


def test_a_rule_holds_a_selector_a_target_and_a_configured_method():
    (rule, excl) = parse_rules([{"op_types": "Conv2d", "op_names": ["a.*"], "method": "cp", "macs_ratio": 0.5,
                                 "form": "folded", "n_iter": 7},
                                {"op_names": ["a.1"], "exclude": True}])
    assert isinstance(rule, Rule) and rule.selector == Selector(op_types=("Conv2d",), op_names=("a.*",))
    assert rule.target == LayerTarget(macs_ratio=0.5) and rule.target.as_kwargs() == {"macs_ratio": 0.5}
    assert rule.method == registry.get("cp", form="folded", n_iter=7) and rule.data_aware is None
    assert excl.exclude and excl.method is None and excl.target is None
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    model_names = {"0.0", "0.1"}
    assert set(select(model, parse_rules([{"op_names": ["0.*"], "method": "channel_svd", "rank": 1}]))) == model_names


def test_method_options_and_data_aware_settings_are_split_once():
    (rule,) = parse_rules([{"method": "lowrank_sparse", "rank": [2, 1], "data_aware": True, "relu": False,
                            "admm_iters": 5, "ridge": 1e-6, "max_positions": 100}])
    assert rule.target.rank == (2, 1)
    assert rule.method == registry.get("lowrank_sparse", admm_iters=5, ridge=1e-6)      # ridge: both
    assert rule.data_aware == DataAwareSettings(relu=False, ridge=1e-6, max_positions=100)
    method, settings = configure("channel_svd", {}, data_aware=False)
    assert method is registry.get("channel_svd") and settings is None


@pytest.mark.parametrize("rule, match", [
    ({"method": "channel_svd", "rank": 2, "relu": True}, "data_aware"),          # a data-aware key without it
    ({"method": "channel_svd", "rank": 2, "splits": 2}, "unknown option"),
    ({"method": "basis", "rank": 2, "splits": 0}, "splits"),
    ({"method": "cp", "rank": 2, "share": "block"}, "unknown option"),
    ({"method": "channel_svd", "rank": (2, 0)}, "positive"),
    ({"method": "channel_svd", "energy": True}, r"\(0, 1\]"),
    ({"method": "channel_svd", "rank": 2, "data_aware": True, "alternate": -1}, "alternate"),
    ({"op_types": 3, "method": "channel_svd", "rank": 2}, "op_types"),
])
def test_bad_rules_name_the_rule(rule, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_rules([{"method": "channel_svd", "rank": 1}, rule])
    assert str(info.value).startswith("rule 1:")


def test_factorize_takes_method_options_and_data_aware_settings_as_keywords():
    layer = nn.Conv2d(4, 6, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    new = convfactor.factorize(layer, "tucker2", rank=2, hooi_iters=0, calibration=x, ridge=1e-6)
    assert new.options == {"hooi_iters": 0, "hooi_tol": 0.01}
    with pytest.raises(ValueError, match="calibration"):
        convfactor.factorize(layer, "tucker2", rank=2, alternate=3)
    configured = registry.get("cp", n_iter=3)
    assert convfactor.factorize(layer, configured, rank=2, form="folded").options["form"] == "folded"
