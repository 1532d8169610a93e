"""The quick-start demo end to end at one epoch per model (the real run is 30 epochs), and its
recipes: the YAML recipes of the demo's models are the demo's own at DEMO_EPOCHS."""
import json
from pathlib import Path

import pytest

from ride_fast.cli import main
from ride_fast.config import config_to_dict, load_config
from ride_fast.demo import DEMO_EPOCHS, demo_recipes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# what only says where and how a run shows itself, not what it trains
RUN_KEYS = {"train.out_dir", "train.progress", "train.keep_last", "train.eval_every"}


def test_demo_writes_table_results_and_plots(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("CE baseline (R32)", "RIDE 3 experts (R32)", "RIDE 3 experts, routed"):
        assert row in out
    # --epochs 1 scales the router's 5 epochs at 30 down to 1; counts of one are singular
    assert "== CE baseline (R32): 1 expert, loss ce, 1 epoch\n" in out and "== RIDE 3 experts (R32): 3 experts, loss ride, 1 epoch\n" in out
    assert "router on the frozen RIDE model, 1 epoch, batch" in out and "router epoch 1/1 " in out and "router epoch 2/" not in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"]["train_class_counts"] == [400, 239, 143, 86, 51, 30, 18, 11, 6, 4]
    models = results["models"]
    assert round(models["CE baseline (R32)"]["mmacs_per_image"], 1) == 70.1
    assert round(models["RIDE 3 experts (R32)"]["mmacs_per_image"], 1) == 102.2
    for r in models.values():
        assert set(r) >= {"overall", "many", "medium", "few", "per_class", "mmacs_per_image"}
        assert len(r["per_class"]) == 10 and 0.0 <= r["overall"] <= 100.0
    for name in ("per_class_accuracy.png", "expert_usage.png", "routed_eval.json"):
        assert (tmp_path / name).stat().st_size > 0
    # stage 2: routers on held-out digits, the threshold calibrated on other held-out digits
    routed = models["RIDE 3 experts, routed"]
    stage2 = routed["stage2"]
    assert stage2["options"]["router_data"] == "heldout" and stage2["options"]["calibrate_threshold"] is True
    assert routed["threshold"] == stage2["calibration"]["threshold"]
    assert "threshold" not in stage2  # one holder: the routed checkpoint's router.threshold
    held = stage2["heldout"]
    assert held["unused_per_class"] == [0, 161, 257, 314, 349, 370, 382, 389, 394, 396]  # 400 - training count
    assert held["router_per_class"] == [0] + [100] * 9
    assert held["calibration_per_class"] == [0, 61, 157, 214, 249, 270, 282, 289, 294, 296]  # the rest, at most 300
    report = json.loads((tmp_path / "routed_eval.json").read_text())
    assert report["threshold"] == routed["threshold"] and report["stage2"]["calibration"]["curve"]
    routed_config = load_config(Path(models["RIDE 3 experts (R32)"]["checkpoint"]).with_name("routed_config.yaml"))
    assert routed_config.router.threshold == routed["threshold"] and routed_config.router.calibrate_threshold


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize(("model", "recipe"), [("CE baseline (R32)", "mnist_lt_ce.yaml"), ("RIDE 3 experts (R32)", "mnist_lt_ride3.yaml")])
def test_the_yaml_recipe_is_the_demos_recipe(model, recipe):
    demo = _flat(config_to_dict(demo_recipes(DEMO_EPOCHS)[model]))
    yaml = _flat(config_to_dict(load_config(CONFIGS / recipe)))
    differ = {k: (demo[k], yaml[k]) for k in demo if demo[k] != yaml[k] and k not in RUN_KEYS}
    assert not differ, f"configs/{recipe} is not the demo's {model!r} recipe (demo, yaml): {differ}"
