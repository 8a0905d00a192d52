"""Rules are checked key by key; a compress that selects or compresses nothing says so; a Plan is
accepted as rules; op_types match subclasses."""
import pytest
import torch
from torch import nn

import convfactor
from convfactor.compression.surgery import is_explicit, parse_rules, rules_of, select
from convfactor.rank import LayerPlan, Plan


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double()


X = torch.randn(1, 3, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("rule, message", [
    ({"method": "channel_svd", "rank": 2, "frobnicate": 3}, "rule 1: unknown key 'frobnicate'; rule keys: op_types"),
    ({"method": "channel_svd", "macs_ration": 0.5}, "rule 1: unknown key 'macs_ration' (did you mean 'macs_ratio'?)"),
    ({"method": "channel_svd", "rank": 2, "op_type": ["Conv2d"]}, "(did you mean 'op_types'?)"),
    ({"op_names": ["0"], "exclude": True, "frobnicate": 3}, "rule 1: unknown key 'frobnicate'"),
    ({"method": "tucker2", "rank": 2, "hooi_iter": 3}, "(did you mean 'hooi_iters'?)"),
    ({"op_names": ["0"], "exclude": ["0"]}, "rule 1: exclude must be true or false, got ['0']"),
    ({"op_names": ["0"], "exclude": "yes"}, "rule 1: exclude must be true or false, got 'yes'"),
    ({"method": "channel_svd", "rank": 2, "data_aware": "no"}, "rule 1: data_aware must be true or false"),
    ({"method": "cp", "energy": 0.9}, "rule 1: cp: an energy target is not defined"),
])
def test_bad_rule_keys_are_one_line_errors(rule, message):
    with pytest.raises(ValueError) as info:
        parse_rules([{"method": "channel_svd", "rank": 1}, rule])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_option_of_another_method_is_an_unknown_option_and_yaml_booleans_pass():
    with pytest.raises(ValueError, match=r"rule 0: channel_svd: unknown option\(s\) \['splits'\]"):
        parse_rules([{"method": "channel_svd", "rank": 2, "splits": 2}])
    (rule,) = parse_rules([{"op_names": "0", "exclude": True, "method": "cp", "rank": 3}])   # leftovers are fine
    assert rule.exclude


def test_rules_that_select_no_layer_raise_and_all_skipped_is_a_warning():
    with pytest.raises(ValueError, match="no layer was selected: the exclude rules remove every layer"):
        convfactor.compress(_model(), [{"method": "channel_svd", "rank": 2}, {"exclude": True}], X)
    with pytest.raises(ValueError, match="no layer was selected: no rules were given"):
        convfactor.compress(_model(), [], X)
    with pytest.raises(ValueError, match="rules must be a dict, a list of dicts or a plan"):
        convfactor.compress(_model(), None, X)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)).double()
    compressed, report = convfactor.compress(depthwise, [{"method": "channel_svd", "energy": 0.9}],
                                             torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert report.compressed == [] and report.warning.startswith("nothing was compressed: all 1 selected layers")
    assert "warning: nothing was compressed" in report.table() and report.to_dict()["warning"] == report.warning
    assert torch.equal(compressed[0].weight, depthwise[0].weight)


def test_a_plan_object_is_accepted_as_rules():
    model = _model()
    plan = Plan(layers=[LayerPlan("0", "channel_svd", [3]), LayerPlan("2", None), LayerPlan("4", "linear_svd", [2])])
    compressed, report = convfactor.compress(model, plan, X)
    applied, _ = plan.apply(model, X)
    assert [(L.name, L.ranks) for L in report.compressed] == [("0", (3,)), ("4", (2,))]
    assert torch.equal(compressed(X), applied(X))

    class Duck:                                  # any object with .rules (a list) or .to_rules()
        rules = [{"op_names": ["2"], "method": "channel_svd", "rank": 1}]
    assert rules_of(Duck()) == Duck.rules
    _, report = convfactor.compress(model, Duck(), X)
    assert [L.name for L in report.compressed] == ["2"]


def test_op_types_match_any_class_in_the_mro():
    class MyConv(nn.Conv2d):
        pass
    model = nn.Sequential(MyConv(3, 4, 3), nn.Conv2d(4, 4, 1))
    assert set(select(model, parse_rules([{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 1}]))) == {"0", "1"}
    assert set(select(model, parse_rules([{"op_types": ["MyConv"], "method": "channel_svd", "rank": 1}]))) == {"0"}


def test_explicit_means_a_rank_or_the_layers_exact_name():
    (by_rank, by_name, escaped, by_glob, by_type) = parse_rules([
        {"op_names": ["layer.*"], "method": "channel_svd", "rank": 2},
        {"op_names": ["layer.0"], "method": "channel_svd", "macs_ratio": 0.5},
        {"op_names": ["head[[]0]"], "method": "channel_svd", "macs_ratio": 0.5},       # glob.escape("head[0]")
        {"op_names": ["layer.?"], "method": "channel_svd", "macs_ratio": 0.5},
        {"op_types": ["Conv2d"], "method": "channel_svd", "energy": 0.9}])
    assert is_explicit(by_rank, "layer.3") and is_explicit(by_name, "layer.0") and is_explicit(escaped, "head[0]")
    assert not is_explicit(by_glob, "layer.0") and not is_explicit(by_type, "layer.0")
