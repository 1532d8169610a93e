"""The threshold from the whole accuracy-cost curve (ride_fast.engine.threshold_curve,
calibration.choose_threshold / calibrate_threshold(grid=None)): one all-experts pass replayed at
every threshold that changes a decision must equal routed inference there, the drop's standard
error is the paired one, and the rule takes the cheapest point whose drop + z SE is allowed.

Shape legend: N images, C classes, E experts, R = E - 1 routers, T thresholds.
"""
import numpy as np
import pytest
import torch

from ride_fast.engine.calibration import calibrate_threshold, choose_threshold
from ride_fast.engine.routed_cost import routed_cost
from ride_fast.engine.threshold_curve import RouterScores, score_routers, threshold_curve
from ride_fast.models import create_model
from ride_fast.router import Router, routed_forward

C, PX = 6, 8


@pytest.fixture(scope="module")
def routed_setup():
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=C, num_experts=3).eval()
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4).eval()
    with torch.no_grad():  # spread the router's probabilities over (0, 1)
        router.fc.weight.mul_(20.0)
    return net, router, routed_cost(net, router, PX)


def _class_mean(correct, y):
    return 100.0 * float(torch.stack([correct[y == c].double().mean() for c in y.unique()]).mean())


def test_every_point_of_the_whole_curve_is_routed_inference(routed_setup, val_loader):
    net, router, cost = routed_setup
    scores = score_routers(net, router, val_loader)
    curve = threshold_curve(scores, cost)
    x = torch.cat([b.images for b in val_loader])
    y = torch.cat([b.labels for b in val_loader])
    N = len(y)
    assert curve.thresholds[0] == 1.0 and curve.thresholds[-1] == 0.0
    assert np.all(np.diff(curve.thresholds) < 0) and len(curve.thresholds) > 2 * N // 3  # one point per distinct decision
    with torch.no_grad():
        all_right = net(x).logits.argmax(1) == y
    for i, t in enumerate(curve.thresholds):
        out = routed_forward(net, router, x, threshold=float(t))
        right = out.logits.argmax(1) == y
        assert curve.accuracy[i] == pytest.approx(_class_mean(right, y), abs=1e-6)
        assert curve.mean_macs[i] == pytest.approx(np.mean([cost.macs_with(int(k)) for k in out.num_experts]))
        np.testing.assert_allclose(curve.usage[i], np.bincount(out.num_experts.numpy() - 1, minlength=3) / N, atol=1e-12)
        np.testing.assert_array_equal(scores.experts_used(float(t)), out.num_experts.numpy())
        # paired standard error: 100 sqrt(discordant) / N with equal classes
        discordant = int((right != all_right).sum())
        assert curve.drop_se[i] == pytest.approx(100.0 * np.sqrt(discordant) / N, abs=1e-9)
    assert curve.usage[0].tolist() == [1.0, 0.0, 0.0] and curve.usage[-1].tolist() == [0.0, 0.0, 1.0]
    assert curve.drop[-1] == pytest.approx(0.0, abs=1e-9) and curve.drop_se[-1] == 0.0
    assert curve.all_experts_accuracy == pytest.approx(_class_mean(all_right, y))


def test_under_bf16_autocast_routed_inference_decides_as_the_replay(routed_setup, val_loader):
    """The network in bf16 (the default precision on a GPU): routed inference must still take, at
    every threshold of the curve, the decisions of the replay that calibration reads."""
    net, router, cost = routed_setup
    scores = score_routers(net, router, val_loader, amp="bf16")
    curve = threshold_curve(scores, cost)
    x = torch.cat([b.images for b in val_loader])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        used = [routed_forward(net, router, x, threshold=float(t)).num_experts.numpy() for t in curve.thresholds]
    for t, u in zip(curve.thresholds, used):
        np.testing.assert_array_equal(scores.experts_used(float(t)), u)


def test_the_rule_takes_the_cheapest_point_whose_drop_plus_z_se_is_allowed(routed_setup, val_loader):
    net, router, cost = routed_setup
    curve = threshold_curve(score_routers(net, router, val_loader), cost)
    for drop in (0.0, 3.0, 10.0, 100.0):
        for z in (0.0, 1.0, 1.645):
            i = choose_threshold(curve, drop, z)
            ok = curve.drop + z * curve.drop_se <= drop + 1e-9
            assert ok[i] and curve.mean_macs[i] == pytest.approx(curve.mean_macs[ok].min())
    # a wider margin never picks a cheaper point
    costs = [curve.mean_macs[choose_threshold(curve, 5.0, z)] for z in (0.0, 1.0, 2.0, 4.0)]
    assert costs == sorted(costs)
    cal = calibrate_threshold(net, router, val_loader, cost, max_accuracy_drop=5.0, grid=None, z=1.0)
    assert cal.threshold == curve.thresholds[choose_threshold(curve, 5.0, 1.0)]
    assert cal.num_thresholds == len(curve.thresholds) and cal.z == 1.0
    assert cal.drop + cal.z * cal.drop_se <= 5.0 + 1e-9
    assert "calibrated on" in cal.summary() and cal.all_experts_macs == cost.macs_with(3)
    x = torch.cat([b.images for b in val_loader])
    y = torch.cat([b.labels for b in val_loader])
    out = routed_forward(net, router, x, threshold=cal.threshold)
    assert _class_mean(out.logits.argmax(1) == y, y) == pytest.approx(cal.routed_accuracy, abs=1e-6)


def test_replay_without_a_network():
    """Three images, two routers: the decisions are the sequential ones (router 2 only after router 1)."""
    probs = np.asarray([[0.9, 0.2, 0.6], [0.1, 0.95, 0.7]], dtype=np.float32)  # [R, N]
    right = np.asarray([[False, True, False], [False, True, True], [True, True, True]])  # [E, N]
    scores = RouterScores(probs, right, np.asarray([0, 1, 2]), 3)

    class Cost:
        num_experts = 3

        def macs_with(self, k):
            return 10 * k

    curve = threshold_curve(scores, Cost())
    used = {float(t): scores.experts_used(float(t)).tolist() for t in curve.thresholds}
    assert used[1.0] == [1, 1, 1] and used[0.0] == [3, 3, 3]
    # reach = running min of the probabilities: (0.9, 0.1), (0.2, 0.2), (0.6, 0.6): four breakpoints, five states
    assert list(used.values()) == [[1, 1, 1], [2, 1, 1], [2, 1, 3], [2, 3, 3], [3, 3, 3]]
    for i, t in enumerate(curve.thresholds):
        n = scores.experts_used(float(t))
        assert curve.mean_macs[i] == pytest.approx(10 * n.mean())
        assert curve.accuracy[i] == pytest.approx(100 * right[n - 1, np.arange(3)].mean())
    assert threshold_curve(scores, Cost(), grid=(0.5,)).usage[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_the_sweep_names_class_mean_and_overall_accuracy_apart():
    """On a test set with unequal classes the class-mean accuracy (what calibration measures, the
    drop's scale) and the accuracy over the images (eval's "overall") differ: the sweep's table and
    JSON points carry both, each under its own name."""
    from ride_fast.engine.threshold_curve import sweep_table

    # 4 images of class 0, 1 of class 1; one router; expert 1 alone gets the class-0 images right,
    # both experts get everything right
    probs = np.asarray([[0.9, 0.9, 0.1, 0.1, 0.9]], dtype=np.float32)  # [R, N]
    right = np.asarray([[True, True, True, True, False], [True, True, True, True, True]])  # [E, N]
    labels = np.asarray([0, 0, 0, 0, 1])

    class Cost:
        num_experts = 2

        def macs_with(self, k):
            return 1e9 * k

    curve = threshold_curve(RouterScores(probs, right, labels, 2), Cost())
    first = curve.point(0)  # threshold 1: expert 1 alone
    assert first["class_mean_accuracy"] == pytest.approx(50.0)  # (4/4 + 0/1) / 2
    assert first["overall"] == pytest.approx(80.0)  # 4 of 5 images
    assert "accuracy" not in first  # no key that leaves open which of the two it is
    for i, t in enumerate(curve.thresholds):
        n = RouterScores(probs, right, labels, 2).experts_used(float(t))
        assert curve.overall[i] == pytest.approx(100 * right[n - 1, np.arange(5)].mean())
    assert curve.all_experts_overall == pytest.approx(100.0) and curve.all_experts_accuracy == pytest.approx(100.0)
    head, top = sweep_table(curve, 0.5).splitlines()[:2]
    assert head.split()[:3] == ["threshold", "class-mean", "overall"]
    assert top.split()[:3] == ["1", "50.00", "80.00"]
