"""Held-out data for stage 2 and threshold calibration (options; the published stage 2 is the default).

A stage-1 network that memorises a small training set makes the published router labels ("the
prefix ensemble is wrong and a longer prefix is right", docs/method.md §5) almost never positive on
it, so the routers never learn to call the last experts. Two options of the router config section
answer that, for data sets whose full training data holds images the long-tailed set left out:

    router.router_data=heldout      the routers train on such unused images (`heldout_split`)
    router.calibrate_threshold      the threshold is the cheapest point of the accuracy-cost curve
                                    of other unused images whose accuracy drop against all experts,
                                    plus router.calibration_z standard errors, is within
                                    router.max_accuracy_drop points (`calibrate_threshold`: one
                                    all-experts pass replayed at every threshold, engine/routed_eval.py)

Shape legend: B images, E experts, R = E - 1 routers, C classes, T thresholds.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ride_fast.config import Config, RouterConfig
from ride_fast.data import ArrayDataset, build_datasets
from ride_fast.engine.routed_cost import RoutedCost
from ride_fast.engine.threshold_curve import ThresholdCurve, score_routers, threshold_curve
from ride_fast.models import RIDENet
from ride_fast.router import Router


HELDOUT_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")  # data sets with a full training set to draw unused images from


def _image_keys(images: Tensor) -> list[bytes]:
    """A content digest per image (uint8 [N, K, H, W]): finds the same image in two data sets."""
    flat = np.ascontiguousarray(images.numpy()).reshape(images.shape[0], -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _subset(ds: ArrayDataset, idx: np.ndarray, name: str) -> ArrayDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


@dataclass
class HeldOut:
    """Unused images of the full data set: `router` trains the routers, `calibration` sets the
    threshold (disjoint; either may be None when not asked for)."""

    router: ArrayDataset | None
    calibration: ArrayDataset | None
    unused_per_class: list[int]

    def as_dict(self) -> dict:
        count = lambda ds: ds.class_counts().tolist() if ds is not None else []  # noqa: E731
        return {"unused_per_class": self.unused_per_class, "router_per_class": count(self.router),
                "calibration_per_class": count(self.calibration)}


def heldout_split(cfg: Config, train_set, test_set=None, *, pool=None) -> HeldOut:
    """Images of the full training data (data.imbalance_factor = 1) that neither the long-tailed
    training set nor the test set holds, found by content. Per class, a seeded shuffle
    (train.seed) gives the first router.heldout_per_class to the routers (router.router_data=heldout)
    and the next router.calibration_per_class to the calibration (router.calibrate_threshold).
    `pool` = the full training data replaces building it."""
    rc: RouterConfig = cfg.router
    if pool is None:
        if cfg.data.name not in HELDOUT_DATASETS:
            raise ValueError(f"held-out stage-2 data needs the full training data of {', '.join(HELDOUT_DATASETS)}; "
                             f"data.name={cfg.data.name} has none: use the published stage 2 (router.router_data=train, "
                             "router.calibrate_threshold=false)")
        pool = build_datasets(dataclasses.replace(cfg.data, imbalance_factor=1.0))[0]
    if not isinstance(train_set, ArrayDataset) or not isinstance(pool, ArrayDataset):
        raise TypeError("router.router_data=heldout and router.calibrate_threshold need a data set held in memory "
                        f"({', '.join(HELDOUT_DATASETS)})")
    seen = set(_image_keys(train_set.images))
    if test_set is not None:
        seen.update(_image_keys(test_set.images))
    unused = np.asarray([i for i, k in enumerate(_image_keys(pool.images)) if k not in seen], dtype=np.int64)
    labels = pool.labels.numpy()
    rng = np.random.default_rng(cfg.train.seed)
    n_router = rc.heldout_per_class if rc.router_data == "heldout" else 0
    n_calib = rc.calibration_per_class if rc.calibrate_threshold else 0
    router_idx, calib_idx = [], []
    for c in range(pool.num_classes):
        idx = rng.permutation(unused[labels[unused] == c])
        router_idx.append(np.sort(idx[:n_router]))
        calib_idx.append(np.sort(idx[n_router : n_router + n_calib]))
    router_idx, calib_idx = np.concatenate(router_idx), np.concatenate(calib_idx)
    if n_router and not len(router_idx) or n_calib and not len(calib_idx):
        raise ValueError(f"{cfg.data.name}: no image of the full training data is left out of the long-tailed set "
                         f"(imbalance_factor {cfg.data.imbalance_factor}); held-out stage-2 data needs some")
    return HeldOut(_subset(pool, router_idx, f"{pool.name}/heldout_router") if n_router else None,
                   _subset(pool, calib_idx, f"{pool.name}/heldout_calibration") if n_calib else None,
                   np.bincount(labels[unused], minlength=pool.num_classes).tolist())


# A fixed grid for `calibrate_threshold(grid=...)` (stage 2 uses the whole curve, grid=None). Weighted BCE
# (w_on = 100) calibrates sigmoid(r) to 100x the odds of "call": 0.99 is about an unweighted 0.5.
THRESHOLD_GRID = (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)



@dataclass
class ThresholdCalibration:
    """The threshold chosen on a calibration split, and the curve it was chosen from (percent
    accuracies, mean per class over the classes present; `curve` is thinned to a few hundred points)."""

    threshold: float
    max_accuracy_drop: float
    all_experts_accuracy: float
    routed_accuracy: float
    mean_macs: float
    num_images: int
    per_class: list[int]
    curve: list[dict]  # threshold, class_mean_accuracy, overall, drop, drop_se, mean_experts, mean_macs, usage (ThresholdCurve.point)
    drop_se: float = 0.0  # standard error of the chosen threshold's drop (points)
    z: float = 0.0  # the rule: drop + z * drop_se <= max_accuracy_drop
    all_experts_macs: float = 0.0
    num_thresholds: int = 0  # points of the curve the choice was made from

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def drop(self) -> float:
        return self.all_experts_accuracy - self.routed_accuracy

    def summary(self) -> str:
        ratio = f" ({self.mean_macs / self.all_experts_macs:.2f} x all experts)" if self.all_experts_macs else ""
        return (f"threshold {self.threshold:.4g} calibrated on {self.num_images} held-out images ({self.num_thresholds} thresholds): "
                f"routed {self.routed_accuracy:.2f} % vs all experts {self.all_experts_accuracy:.2f} %, drop "
                f"{self.drop:.2f} +- {self.drop_se:.2f} points (drop + {self.z:g} SE <= {self.max_accuracy_drop:g} allowed), "
                f"{self.mean_macs / 1e6:.1f} MMACs per image{ratio}")


CURVE_POINTS = 200  # points of the calibration curve kept in the routed checkpoint


def choose_threshold(curve: ThresholdCurve, max_accuracy_drop: float, z: float = 0.0) -> int:
    """Index of the cheapest point (lowest mean MACs, the higher threshold on ties) whose drop
    plus z standard errors is at most `max_accuracy_drop`; none: the lowest threshold."""
    ok = np.flatnonzero(curve.drop + z * curve.drop_se <= max_accuracy_drop + 1e-9)
    if not ok.size:
        return len(curve.thresholds) - 1
    return int(min(ok, key=lambda i: (curve.mean_macs[i], -curve.thresholds[i])))


def calibrate_threshold(net: RIDENet, router: Router, loader, cost: RoutedCost, *, max_accuracy_drop: float = 1.0,
                        grid=THRESHOLD_GRID, amp: str = "none", z: float = 0.0) -> ThresholdCalibration:
    """The cheapest threshold whose routed accuracy on `loader` is, with z standard errors of
    margin, at most `max_accuracy_drop` points below all experts (`choose_threshold`).

    grid=None scores every threshold that changes a decision (the whole curve), else the
    thresholds of `grid`. One all-experts pass gives every router's probability on every image:
    routing only decides how many of the (deterministic) experts an image uses, so every threshold
    is replayed from the same pass (`score_routers`, `threshold_curve`). Accuracy is the mean over
    classes present, as on a balanced test set.
    """
    if grid is not None:
        grid = sorted({float(t) for t in grid}, reverse=True)
        if not grid or not all(0.0 <= t <= 1.0 for t in grid):
            raise ValueError(f"calibration thresholds must lie in [0, 1], got {grid}")
    curve = threshold_curve(score_routers(net, router, loader, amp), cost, grid)
    best = choose_threshold(curve, max_accuracy_drop, z)
    return ThresholdCalibration(float(curve.thresholds[best]), float(max_accuracy_drop), curve.all_experts_accuracy,
                                float(curve.accuracy[best]), float(curve.mean_macs[best]), curve.num_images, curve.per_class,
                                curve.points(CURVE_POINTS, keep=(best,)), float(curve.drop_se[best]), float(z),
                                float(cost.macs_with(cost.num_experts)), len(curve.thresholds))
