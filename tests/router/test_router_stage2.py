"""Stage-2 options beyond the spec: held-out router data and threshold calibration
(ride_fast.engine.route: Stage2Options, heldout_split, calibrate_threshold, fit_stage2).

Shape legend: N images, C classes, E experts, R = E - 1 routers, T thresholds.
"""
import dataclasses

import numpy as np
import pytest
import torch

from ride_fast.config import ConfigError, config_from_dict
from ride_fast.data import ArrayDataset, InMemoryLoader
from ride_fast.engine.checkpoint import load_checkpoint
from ride_fast.engine.route import (
    THRESHOLD_GRID,
    Stage2Options,
    calibrate_threshold,
    fit_stage2,
    heldout_split,
    routed_cost,
)
from ride_fast.models import create_model
from ride_fast.router import Router, routed_forward

C, PX = 6, 8


def pool_data(per_class=20, seed=0) -> ArrayDataset:
    """A balanced 'full training set' of distinct random images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="pool")


def subset(ds, idx, name):
    t = torch.as_tensor(idx, dtype=torch.long)
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


def long_tailed(pool, counts=(20, 12, 8, 5, 3, 2), test_per_class=2):
    """(train, test): class c keeps its first counts[c] pool images (the head keeps all), the test
    set takes the last test_per_class of the classes that leave some over."""
    labels = pool.labels.numpy()
    train_idx, test_idx = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        train_idx += idx[:n].tolist()
        if len(idx) - n >= test_per_class:
            test_idx += idx[-test_per_class:].tolist()
    return subset(pool, train_idx, "train"), subset(pool, test_idx, "test")


def tiny_cfg(**router):
    return config_from_dict({
        "model": {"channels_last": False},
        "data": {"image_size": PX, "eval_batch_size": 16},
        "router": {"top_k": 4, "batch_size": 8, "epochs": 2, **router},
        "train": {"device": "cpu", "seed": 0},
    })


def tiny_net(E=3, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet32", num_classes=C, num_experts=E).eval()


def keys(ds):
    return {bytes(row) for row in ds.images.reshape(len(ds), -1).numpy()}


# --- options ------------------------------------------------------------------------------------


def test_default_options_are_the_specs_stage_2():
    opts = Stage2Options.from_router_config(tiny_cfg().router)
    assert opts == Stage2Options() and opts.router_data == "train" and opts.threshold == "config" and not opts.uses_heldout


def test_options_follow_a_router_section_that_sets_them():
    rc = tiny_cfg(router_data="heldout", calibrate=True, max_accuracy_drop=0.5).router
    assert Stage2Options.from_router_config(rc) == Stage2Options(router_data="heldout", threshold="auto", max_accuracy_drop=0.5)
    assert Stage2Options.from_router_config(tiny_cfg(threshold=0.3).router).threshold == "config"
    with pytest.raises(ConfigError, match="router.router_data"):
        tiny_cfg(router_data="val")


@pytest.mark.parametrize("bad", [{"router_data": "val"}, {"threshold": 0.3}, {"heldout_per_class": 0}, {"max_accuracy_drop": -1.0},
                                 {"max_accuracy_drop": float("nan")}])
def test_bad_options_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        Stage2Options(**bad)


# --- held-out split -----------------------------------------------------------------------------


def test_heldout_split_takes_unused_images_disjoint_from_train_test_and_each_other():
    pool = pool_data()
    train, test = long_tailed(pool)
    opts = Stage2Options(router_data="heldout", heldout_per_class=6, threshold="auto", calibration_per_class=4)
    split = heldout_split(tiny_cfg(), train, test, opts, pool=pool)
    r, k = split.router, split.calibration
    assert not keys(r) & keys(train) and not keys(r) & keys(test) and not keys(k) & keys(train) and not keys(k) & keys(test)
    assert not keys(r) & keys(k)
    # unused per class: 20 - count - test (the head class keeps every image)
    assert split.unused_per_class == [0, 6, 10, 13, 15, 16]
    assert r.class_counts().tolist() == [0, 6, 6, 6, 6, 6]
    assert k.class_counts().tolist() == [0, 0, 4, 4, 4, 4]
    again = heldout_split(tiny_cfg(), train, test, opts, pool=pool)
    assert torch.equal(again.router.images, r.images) and torch.equal(again.calibration.images, k.images)  # seeded
    assert split.as_dict()["router_per_class"] == [0, 6, 6, 6, 6, 6]


def test_heldout_split_only_builds_what_the_options_ask_for():
    pool = pool_data()
    train, test = long_tailed(pool)
    only_calib = heldout_split(tiny_cfg(), train, test, Stage2Options(threshold="auto", calibration_per_class=3), pool=pool)
    assert only_calib.router is None and only_calib.calibration.class_counts().tolist() == [0, 3, 3, 3, 3, 3]


def test_heldout_split_errors():
    pool = pool_data()
    train, test = long_tailed(pool)
    opts = Stage2Options(router_data="heldout")
    cfg = dataclasses.replace(tiny_cfg(), data=dataclasses.replace(tiny_cfg().data, name="image_list"))
    with pytest.raises(ValueError, match="full training data"):
        heldout_split(cfg, train, test, opts)
    with pytest.raises(ValueError, match="left out"):
        heldout_split(tiny_cfg(), pool, None, opts, pool=pool)  # the training set is the whole pool


# --- calibration --------------------------------------------------------------------------------


def _val_loader(n_per_class=5, seed=3):
    return InMemoryLoader(pool_data(n_per_class, seed), 8, train=False)


def test_calibration_curve_matches_routed_inference_at_every_threshold():
    net = tiny_net()
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4).eval()
    with torch.no_grad():  # spread the router's probabilities over (0, 1)
        router.fc.weight.mul_(20.0)
    loader = _val_loader()
    cost = routed_cost(net, router, PX)
    grid = (0.9, 0.6, 0.5, 0.3, 0.1, 0.0)
    cal = calibrate_threshold(net, router, loader, cost, max_accuracy_drop=100.0, grid=grid)
    assert [p["threshold"] for p in cal.curve] == sorted(grid, reverse=True)
    x = torch.cat([b.images for b in loader])
    y = torch.cat([b.labels for b in loader])
    used_counts = set()
    for point in cal.curve:
        out = routed_forward(net, router, x, threshold=point["threshold"])
        correct = (out.logits.argmax(1) == y).double()
        per_class = torch.stack([correct[y == c].mean() for c in range(C)])
        assert point["accuracy"] == pytest.approx(100 * float(per_class.mean()), abs=1e-6)
        assert point["mean_experts"] == pytest.approx(float(out.num_experts.double().mean()))
        used_counts.add(round(point["mean_experts"], 6))
        expected_macs = float(sum(cost.macs_with(int(k)) for k in out.num_experts)) / len(y)
        assert point["mean_macs"] == pytest.approx(expected_macs)
    assert len(used_counts) > 2, "the grid should give different usage mixes"
    assert cal.curve[-1]["mean_experts"] == pytest.approx(3.0)  # threshold 0: every expert
    assert cal.all_experts_accuracy == pytest.approx(cal.curve[-1]["accuracy"])
    assert cal.num_images == len(y) and cal.per_class == [5] * C


def test_calibration_picks_the_cheapest_threshold_within_the_drop():
    net = tiny_net()
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4).eval()
    with torch.no_grad():
        router.fc.weight.mul_(20.0)
    loader = _val_loader()
    cost = routed_cost(net, router, PX)
    for drop in (0.0, 5.0, 100.0):
        cal = calibrate_threshold(net, router, loader, cost, max_accuracy_drop=drop)
        ok = [p for p in cal.curve if p["accuracy"] >= cal.all_experts_accuracy - drop - 1e-9]
        assert cal.mean_macs == pytest.approx(min(p["mean_macs"] for p in ok))
        assert cal.routed_accuracy >= cal.all_experts_accuracy - drop - 1e-9
        assert cal.threshold in THRESHOLD_GRID
    cheapest = calibrate_threshold(net, router, loader, cost, max_accuracy_drop=100.0)
    assert cheapest.mean_macs == pytest.approx(min(p["mean_macs"] for p in cheapest.curve))
    with pytest.raises(ValueError, match="0, 1"):
        calibrate_threshold(net, router, loader, cost, grid=(1.5,))


# --- the whole stage 2 --------------------------------------------------------------------------


def test_fit_stage2_default_is_the_spec():
    pool = pool_data()
    train, test = long_tailed(pool)
    cfg = tiny_cfg(threshold=0.4)
    result = fit_stage2(cfg, tiny_net(), train, test, log=lambda s: None)
    assert result.threshold == 0.4 and result.calibration is None and result.heldout is None and result.cost is None
    assert result.trainer.class_counts.tolist() == train.class_counts().tolist()
    assert result.trainer.stage2_info["options"] == dataclasses.asdict(Stage2Options())


def test_fit_stage2_on_heldout_data_with_a_calibrated_threshold(tmp_path):
    pool = pool_data()
    train, test = long_tailed(pool)
    opts = Stage2Options(router_data="heldout", heldout_per_class=6, threshold="auto", calibration_per_class=4, max_accuracy_drop=0.0)
    net = tiny_net()
    result = fit_stage2(tiny_cfg(), net, train, test, options=opts, log=lambda s: None, pool=pool)
    trainer = result.trainer
    assert len(result.heldout.router) == 30 and trainer.loader.dataset is result.heldout.router  # routers saw held-out images
    assert trainer.class_counts.tolist() == [20, 12, 8, 5, 3, 2]  # the splits stay those of the training set
    assert result.threshold == result.calibration.threshold == trainer.cfg.router.threshold
    assert result.calibration.routed_accuracy >= result.calibration.all_experts_accuracy - 1e-9
    path = trainer.save(tmp_path / "routed.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["router"]["threshold"] == result.threshold  # `ride-fast eval` routes with it
    assert ckpt["class_counts"] == [20, 12, 8, 5, 3, 2]
    assert ckpt["stage2"]["calibration"]["threshold"] == result.threshold
    assert ckpt["stage2"]["heldout"]["router_per_class"] == [0, 6, 6, 6, 6, 6]
    assert ckpt["stage2"]["options"]["router_data"] == "heldout"
