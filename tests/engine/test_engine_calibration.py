"""Stage-2 options beyond the published recipe: held-out router data and threshold calibration
(ride_fast.engine.calibration: heldout_split, calibrate_threshold).

Shape legend: N images, C classes, E experts, R = E - 1 routers, T thresholds.
"""
import dataclasses

import pytest
import torch

from ride_fast.config import config_from_dict
from ride_fast.engine.calibration import THRESHOLD_GRID, calibrate_threshold, heldout_split
from ride_fast.engine.routed_cost import routed_cost
from ride_fast.models import create_model
from ride_fast.router import Router, routed_forward

C, PX = 6, 8


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


# --- held-out split -----------------------------------------------------------------------------


def test_heldout_split_takes_unused_images_disjoint_from_train_test_and_each_other(lt_pool):
    pool, train, test = lt_pool
    cfg = tiny_cfg(router_data="heldout", heldout_per_class=6, calibrate_threshold=True, calibration_per_class=4)
    split = heldout_split(cfg, train, test, pool=pool)
    r, k = split.router, split.calibration
    assert not keys(r) & keys(train) and not keys(r) & keys(test) and not keys(k) & keys(train) and not keys(k) & keys(test)
    assert not keys(r) & keys(k)
    # unused per class: 20 - count - test (the head class keeps every image)
    assert split.unused_per_class == [0, 6, 10, 13, 15, 16]
    assert r.class_counts().tolist() == [0, 6, 6, 6, 6, 6]
    assert k.class_counts().tolist() == [0, 0, 4, 4, 4, 4]
    again = heldout_split(cfg, train, test, pool=pool)
    assert torch.equal(again.router.images, r.images) and torch.equal(again.calibration.images, k.images)  # seeded
    assert split.as_dict()["router_per_class"] == [0, 6, 6, 6, 6, 6]


def test_heldout_split_only_builds_what_the_options_ask_for(lt_pool):
    pool, train, test = lt_pool
    only_calib = heldout_split(tiny_cfg(calibrate_threshold=True, calibration_per_class=3), train, test, pool=pool)
    assert only_calib.router is None and only_calib.calibration.class_counts().tolist() == [0, 3, 3, 3, 3, 3]


def test_heldout_split_errors(lt_pool):
    pool, train, test = lt_pool
    heldout = tiny_cfg(router_data="heldout")
    cfg = dataclasses.replace(heldout, data=dataclasses.replace(heldout.data, name="image_list"))
    with pytest.raises(ValueError, match="full training data"):
        heldout_split(cfg, train, test)
    with pytest.raises(ValueError, match="left out"):
        heldout_split(heldout, pool, None, pool=pool)  # the training set is the whole pool


# --- calibration --------------------------------------------------------------------------------


def test_calibration_curve_matches_routed_inference_at_every_threshold(val_loader):
    net = tiny_net()
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4).eval()
    with torch.no_grad():  # spread the router's probabilities over (0, 1)
        router.fc.weight.mul_(20.0)
    loader = val_loader
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
        assert point["class_mean_accuracy"] == pytest.approx(100 * float(per_class.mean()), abs=1e-6)
        assert point["overall"] == pytest.approx(100 * float(correct.mean()), abs=1e-6)
        assert point["mean_experts"] == pytest.approx(float(out.num_experts.double().mean()))
        used_counts.add(round(point["mean_experts"], 6))
        expected_macs = float(sum(cost.macs_with(int(k)) for k in out.num_experts)) / len(y)
        assert point["mean_macs"] == pytest.approx(expected_macs)
    assert len(used_counts) > 2, "the grid should give different usage mixes"
    assert cal.curve[-1]["mean_experts"] == pytest.approx(3.0)  # threshold 0: every expert
    assert cal.all_experts_accuracy == pytest.approx(cal.curve[-1]["class_mean_accuracy"])
    assert cal.num_images == len(y) and cal.per_class == [5] * C


def test_calibration_picks_the_cheapest_threshold_within_the_drop(val_loader):
    net = tiny_net()
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4).eval()
    with torch.no_grad():
        router.fc.weight.mul_(20.0)
    loader = val_loader
    cost = routed_cost(net, router, PX)
    for drop in (0.0, 5.0, 100.0):
        cal = calibrate_threshold(net, router, loader, cost, max_accuracy_drop=drop)
        ok = [p for p in cal.curve if p["class_mean_accuracy"] >= cal.all_experts_accuracy - drop - 1e-9]
        assert cal.mean_macs == pytest.approx(min(p["mean_macs"] for p in ok))
        assert cal.routed_accuracy >= cal.all_experts_accuracy - drop - 1e-9
        assert cal.threshold in THRESHOLD_GRID
    cheapest = calibrate_threshold(net, router, loader, cost, max_accuracy_drop=100.0)
    assert cheapest.mean_macs == pytest.approx(min(p["mean_macs"] for p in cheapest.curve))
    with pytest.raises(ValueError, match="0, 1"):
        calibrate_threshold(net, router, loader, cost, grid=(1.5,))
