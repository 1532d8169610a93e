import json

import numpy as np
import pytest

from ride_fast.analysis import (
    decompose,
    long_tail_pool,
    method_config,
    run_bias_variance,
)
from ride_fast.config import ConfigError
from ride_fast.data import long_tail_counts

COUNTS = [150, 50, 5]  # class 0 many, class 1 medium, class 2 few


def test_decomposition_of_a_hand_made_table():
    labels = np.array([0, 0, 1, 2, 2])
    preds = np.array([
        [0, 1, 1, 0, 2],
        [0, 1, 2, 1, 2],
        [0, 2, 1, 1, 2],
        [1, 2, 2, 0, 2],
    ])
    bv = decompose(preds, labels, COUNTS)
    # image 1: 1 and 2 tie (2 votes each) -> the smaller class 1; image 3: 0 and 1 tie -> 0
    assert bv.main_prediction.tolist() == [0, 1, 1, 0, 2]
    assert bv.bias.tolist() == [0, 1, 0, 1, 0]
    assert bv.variance.tolist() == [0.25, 0.5, 0.5, 0.5, 0.0]
    assert bv.accuracy.tolist() == [75.0, 0.0, 50.0, 0.0, 100.0]
    assert bv.per_class["bias"].tolist() == [0.5, 0.0, 0.5]
    assert bv.per_class["variance"].tolist() == [0.375, 0.5, 0.25]
    assert bv.per_class["accuracy"].tolist() == [37.5, 50.0, 50.0]
    assert bv.splits["many"] == {"bias": 0.5, "variance": 0.375, "accuracy": 37.5}
    assert bv.splits["medium"] == {"bias": 0.0, "variance": 0.5, "accuracy": 50.0}
    assert bv.splits["few"] == {"bias": 0.5, "variance": 0.25, "accuracy": 50.0}
    assert bv.splits["overall"] == pytest.approx({"bias": 0.4, "variance": 0.35, "accuracy": 45.0})
    assert bv.run_accuracy.tolist() == [60.0, 40.0, 60.0, 20.0]
    assert bv.run_accuracy.mean() == pytest.approx(bv.splits["overall"]["accuracy"])


def test_split_is_mean_over_classes_and_absent_classes_are_nan():
    # two many classes (0: 2 images, 1: 1 image); the few class 2 has no test image
    labels = np.array([0, 0, 1])
    preds = np.array([[0, 1, 1], [0, 1, 0]])
    bv = decompose(preds, labels, [200, 150, 3])
    # image 1: votes {1: 2} -> main 1 != 0; image 2: 1 and 0 tie -> main 0 != 1, variance 1/2
    assert bv.per_class["bias"][:2].tolist() == [0.5, 1.0]
    assert bv.per_class["variance"][:2].tolist() == [0.0, 0.5]
    assert np.isnan(bv.per_class["bias"][2]) and np.isnan(bv.splits["few"]["bias"])
    assert bv.splits["many"]["variance"] == pytest.approx((0.0 + 0.5) / 2)  # the mean of the classes' means
    assert bv.splits["overall"]["variance"] == pytest.approx(0.5 / 3)  # over images


def test_identical_runs_have_no_variance_and_bias_is_the_error():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    one = rng.integers(0, 3, 50)
    bv = decompose(np.stack([one] * 4), labels, COUNTS)
    assert bv.variance.max() == 0.0
    assert bv.splits["overall"]["bias"] == pytest.approx(1 - bv.splits["overall"]["accuracy"] / 100)


@pytest.mark.parametrize("preds, labels, match", [
    (np.zeros(5, dtype=int), np.zeros(5, dtype=int), "table"),
    (np.zeros((2, 5), dtype=int), np.zeros(4, dtype=int), "labels must have shape"),
    (np.full((2, 5), 3), np.zeros(5, dtype=int), "outside 0..2"),
    (np.zeros((2, 5)), np.zeros(5, dtype=int), "integer"),
])
def test_bad_tables_are_clear_errors(preds, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        decompose(preds, labels, COUNTS)


def test_draws_share_the_profile_but_not_the_images(pool, make_cfg):
    cfg = make_cfg("unused")
    lt = long_tail_pool(cfg.data, 0.6, pool)
    assert lt.counts == long_tail_counts(24, 10, 10.0)  # 60 % of the 40 pool images per class at the head
    a, b, a2 = lt.draw(0), lt.draw(1), lt.draw(0)
    for d in (a, b):
        assert d.class_counts().tolist() == lt.counts
    assert np.array_equal(a.images.numpy(), a2.images.numpy())  # reproducible
    assert not np.array_equal(a.images.numpy(), b.images.numpy())  # different samples, head class included
    head_a = {bytes(x) for x in a.images[a.labels == 0].numpy().reshape(24, -1)}
    head_b = {bytes(x) for x in b.images[b.labels == 0].numpy().reshape(24, -1)}
    assert head_a != head_b
    pool_keys = {bytes(x) for x in pool[0].images.numpy().reshape(len(pool[0]), -1)}
    assert head_a <= pool_keys
    with pytest.raises(ValueError, match="head_fraction"):
        long_tail_pool(cfg.data, 1.5, pool)


def test_method_presets_recipes_and_typos(tmp_path, make_cfg):
    base = make_cfg("x")
    name, cfg = method_config(base, "ce")
    assert (name, cfg.model.num_experts, cfg.model.use_norm, cfg.loss.name) == ("ce", 1, False, "ce")
    name, cfg = method_config(base, "ride4")
    assert cfg.model.num_experts == 4 and cfg.model.reduce_dimension and cfg.loss.name == "ride"
    assert method_config(base, "ldam")[1].model.use_norm
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  num_experts: 2\nloss:\n  classification: focal\n")
    name, cfg = method_config(base, str(recipe))
    assert name == "mine" and cfg.model.num_experts == 2 and cfg.loss.classification == "focal"
    with pytest.raises(ValueError, match="did you mean 'ldam'"):
        method_config(base, "ldma")
    recipe.write_text("loss:\n  clasification: ce\n")
    with pytest.raises(ConfigError, match="mine.yaml"):
        method_config(base, str(recipe))


def test_end_to_end_in_two_processes_is_resumable_and_refuses_a_changed_config(tmp_path, pool, make_cfg):
    cfg = make_cfg("unused", "analysis.head_fraction=0.6")
    report = run_bias_variance(cfg, runs=2, methods=["ce", "ride2"], workers=2, out_dir=tmp_path, pool=pool, log=lambda s: None)
    data = json.loads((tmp_path / "bias_variance.json").read_text())
    assert (tmp_path / "bias_variance.png").stat().st_size > 0
    assert set(data["methods"]) == {"ce", "ride2"} and data["runs"] == 2
    for m in data["methods"].values():
        for split in ("many", "medium", "few", "overall"):
            if m[split]["bias"] is not None:
                assert 0 <= m[split]["bias"] <= 1 and 0 <= m[split]["variance"] <= 0.5  # 2 runs: at most half disagree
        assert len(m["run_accuracy"]) == 2
    last = tmp_path / "ride2" / "run_001" / "last.pt"
    assert json.loads((last.parent / "data.json").read_text())["run"] == 1
    stamp = last.stat().st_mtime_ns

    messages = []
    again = run_bias_variance(cfg, runs=2, methods=["ce", "ride2"], out_dir=tmp_path, pool=pool, log=messages.append)
    assert sum(m.endswith(": done already, skipped") for m in messages) == 4 and last.stat().st_mtime_ns == stamp
    # a re-run says what it skips and what it still computes
    assert "4 runs of 4 done already (skipped); nothing left to train" in messages
    assert any(m.startswith("bias-variance: predicting the ") and "with the 4 checkpoints" in m for m in messages)
    np.testing.assert_array_equal(again.methods["ce"].variance, report.methods["ce"].variance)  # the same models, read back

    with pytest.raises(ValueError, match="another config"):
        run_bias_variance(make_cfg("unused", "optim.lr=0.05"), runs=2, methods=["ce"], out_dir=tmp_path, pool=pool,
                          log=lambda s: None)
