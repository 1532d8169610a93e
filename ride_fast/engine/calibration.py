"""Held-out data for stage 2 and threshold calibration (options; the published stage 2 is the default).

A stage-1 network that memorises a small training set makes the published router labels ("the
prefix ensemble is wrong and a longer prefix is right", docs/method.md §5) almost never positive on
it, so the routers never learn to call the last experts. Two options of the router config section
answer that, for data sets whose full training data holds images the long-tailed set left out:

    router.router_data=heldout      the routers train on such unused images (`heldout_split`)
    router.calibrate_threshold      the threshold is the cheapest of `THRESHOLD_GRID` whose routed
                                    accuracy on other unused images stays within
                                    router.max_accuracy_drop points of all experts
                                    (`calibrate_threshold`; one all-experts pass scores every threshold)

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
from ride_fast.engine.runtime import autocast_context
from ride_fast.models import RIDENet
from ride_fast.router import Router, prefix_mean_logits


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
        raise TypeError("held-out stage-2 data needs in-memory data sets (ArrayDataset)")
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


# Weighted BCE (w_on = 100) calibrates sigmoid(r) to 100x the odds of 'call': 0.99 is about an unweighted 0.5.
THRESHOLD_GRID = (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)


@dataclass
class ThresholdCalibration:
    """The threshold chosen on a calibration split, and the curve it was chosen from (percent
    accuracies, mean per class over the classes present)."""

    threshold: float
    max_accuracy_drop: float
    all_experts_accuracy: float
    routed_accuracy: float
    mean_macs: float
    num_images: int
    per_class: list[int]
    curve: list[dict]  # threshold, accuracy, mean_experts, mean_macs

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"threshold {self.threshold:g} calibrated on {self.num_images} held-out images: routed {self.routed_accuracy:.2f} % "
                f"vs all experts {self.all_experts_accuracy:.2f} % (allowed drop {self.max_accuracy_drop:g} points), "
                f"{self.mean_macs / 1e6:.1f} MMACs per image")


@torch.no_grad()
def calibrate_threshold(net: RIDENet, router: Router, loader, cost: RoutedCost, *, max_accuracy_drop: float = 1.0,
                        grid=THRESHOLD_GRID, amp: str = "none") -> ThresholdCalibration:
    """The cheapest threshold of `grid` (lowest mean MACs per image, the higher threshold on ties)
    whose routed accuracy on `loader` is at most `max_accuracy_drop` points below all experts.

    One all-experts pass gives every router's probability on every image: routing only decides
    how many of the (deterministic) experts an image uses, so every threshold is scored from the
    same pass. Accuracy is the mean over classes present, as on a balanced test set.
    """
    device = next(net.parameters()).device
    net.eval()
    router.eval()
    C, E = net.num_classes, net.num_experts
    grid = sorted({float(t) for t in grid}, reverse=True)
    if not grid or not all(0.0 <= t <= 1.0 for t in grid):
        raise ValueError(f"calibration thresholds must lie in [0, 1], got {grid}")
    T = len(grid)
    th = torch.tensor(grid, device=device).view(T, 1, 1)
    correct = torch.zeros(T + 1, C, dtype=torch.long, device=device)  # row T: all experts
    total = torch.zeros(C, dtype=torch.long, device=device)
    used = torch.zeros(T, E, dtype=torch.long, device=device)  # [threshold, experts used - 1]
    for batch in loader:
        y = batch.labels
        with autocast_context(device, amp):
            out = net(batch.images)
        means = prefix_mean_logits(out.expert_logits)  # [E, B, C] float32
        right = means.argmax(-1) == y  # [E, B]
        p = torch.sigmoid(router.forward_all(out.features[:-1].float(), means[:-1]).float())  # [R, B]
        go = (p.unsqueeze(0) > th).long().cumprod(1)  # [T, R, B]: still going after router i
        n = 1 + go.sum(1)  # [T, B] experts used
        hit = right.gather(0, n - 1)  # [T, B]: the prediction of the experts used is right
        correct[:T] += torch.stack([torch.bincount(y[h], minlength=C) for h in hit])
        correct[T] += torch.bincount(y[right[-1]], minlength=C)
        total += torch.bincount(y, minlength=C)
        used += torch.stack([torch.bincount(k - 1, minlength=E) for k in n])
    present = total > 0
    if not present.any():
        raise ValueError("calibrate_threshold: the loader yielded no images")
    acc = (100.0 * correct[:, present].double() / total[present].double()).mean(1).tolist()  # [T + 1]
    shares = (used.double() / used.sum(1, keepdim=True)).cpu().numpy()
    macs = [float(sum(s[k] * cost.macs_with(k + 1) for k in range(E))) for s in shares]
    curve = [{"threshold": t, "accuracy": acc[i], "mean_experts": float((shares[i] * np.arange(1, E + 1)).sum()), "mean_macs": macs[i]}
             for i, t in enumerate(grid)]
    ok = [i for i in range(T) if acc[i] >= acc[T] - max_accuracy_drop - 1e-9]
    best = min(ok, key=lambda i: (macs[i], -grid[i])) if ok else T - 1  # none within the drop: the lowest threshold
    return ThresholdCalibration(grid[best], float(max_accuracy_drop), acc[T], acc[best], macs[best], int(total.sum()),
                                total.tolist(), curve)
