"""scripts/train_weights.py's --from-shipped: the shipped weights stand in for stage 1 only when they
record exactly stage 1's recipe (weights of the whole multi-stage recipe do not)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_weights.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_from_shipped_needs_weights_of_exactly_stage_one(script, tmp_path):
    recipe = script.RECIPES["edsr_baseline_x2"]
    assert len(recipe["stages"]) == 2 and recipe["stages"][0] == {}
    stage1 = {k: v for k, v in recipe.items() if k != "stages"}
    path = tmp_path / "w.json"
    assert not script.first_stage_from(path, recipe)                       # no record: no
    path.write_text(json.dumps({"recipe": stage1}))
    assert script.first_stage_from(path, recipe)
    path.write_text(json.dumps({"recipe": {**stage1, "steps": 1999}}))
    assert not script.first_stage_from(path, recipe)
    path.write_text(json.dumps({"recipe": recipe}))                        # the whole recipe's weights
    assert not script.first_stage_from(path, recipe)


def test_from_shipped_refuses_before_any_training(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "first_stage_from", lambda path, recipe: False)
    monkeypatch.setattr(script, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exc:
        script.main(["edsr_baseline_x2", "--from-shipped", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    assert exc.value.code == 2 and not any(tmp_path.iterdir())
