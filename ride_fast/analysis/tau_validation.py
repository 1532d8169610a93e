"""The validation split on which tau-normalisation (ride_fast.analysis.two_stage) chooses tau.

Shape legend: N images, C classes.

Validation split for tau (`analysis.val_source`):
    pool   up to val_per_class images per class from the full training data that the long-tailed
           training set left out (mnist_lt, cifar10_lt, cifar100_lt): never seen by the network.
           Found by image content, so it does not depend on how the subset was drawn. Every class
           needs unused images, which the standard MNIST-LT / CIFAR-LT head class (built from all
           of its images) does not have.
    train  a class-stratified split of the training set itself (at most val_per_class images and at
           most half of each class). The stage-1 network was trained on those images, so tau is
           chosen on data it has seen.
    auto   (default) pool for every class that has unused images, the training set for the others
           (in the standard sets: the head class alone); the report lists those classes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ride_fast.config import Config
from ride_fast.data import ArrayDataset, build_datasets

POOL_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")


def _image_keys(images: Tensor) -> list[bytes]:
    """A content digest per image (uint8 [N, K, H, W])."""
    flat = np.ascontiguousarray(images.numpy()).reshape(images.shape[0], -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def unused_pool_images(train_set: ArrayDataset, pool: ArrayDataset) -> np.ndarray:
    """Indices of the pool images whose content is not in `train_set`."""
    seen = set(_image_keys(train_set.images))
    return np.asarray([i for i, k in enumerate(_image_keys(pool.images)) if k not in seen], dtype=np.int64)


def _subset(ds: ArrayDataset, idx: np.ndarray, name: str) -> ArrayDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


def _per_class_pick(labels: np.ndarray, candidates: np.ndarray, num_classes: int, take, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = candidates[labels[candidates] == c]
        out.append(np.sort(rng.permutation(idx)[: take(len(idx))]))
    return np.concatenate(out)


@dataclass
class Validation:
    """The validation split for tau: `dataset`, where it came from, and the classes it took from the
    training set (images the stage-1 network was trained on)."""

    dataset: ArrayDataset
    source: str  # "pool", "pool+train" (auto: classes with no unused image fall back to the training set) or "train"
    seen_classes: list[int]

    def as_dict(self) -> dict:
        return {"source": self.source, "images": len(self.dataset), "per_class": self.dataset.class_counts().tolist(),
                "classes_from_training_set": self.seen_classes}


def validation_split(cfg: Config, train_set, *, source: str | None = None, pool=None) -> Validation:
    """The validation split following `analysis.val_source` (see the module docstring).

    pool: up to val_per_class unused images per class (every class must have some); train: up to
    val_per_class and at most half of each class from the training set; auto: pool per class, and
    the training set for the classes that have no unused image (the head class of MNIST-LT and
    CIFAR-LT takes all of its images). `pool` = the full training data replaces building it."""
    a = cfg.analysis
    source = source or a.val_source
    if source not in ("auto", "pool", "train"):
        raise ValueError(f"analysis.val_source must be auto, pool or train, got {source!r}")
    if a.val_per_class < 1:
        raise ValueError(f"analysis.val_per_class must be >= 1, got {a.val_per_class}")
    if not isinstance(train_set, ArrayDataset):
        raise TypeError(f"tau selection needs an in-memory training set; {train_set.name} is read from files")
    C = train_set.num_classes
    train_labels = train_set.labels.numpy()
    from_train = lambda n: min(a.val_per_class, n // 2)
    if source in ("auto", "pool"):
        if pool is None and cfg.data.name in POOL_DATASETS:
            pool = build_datasets(dataclasses.replace(cfg.data, imbalance_factor=1.0))[0]
        if pool is None:
            if source == "pool":
                raise ValueError(f"analysis.val_source=pool needs the full training data of {', '.join(POOL_DATASETS)}; "
                                 f"data.name={cfg.data.name} has none; use analysis.val_source=train")
        else:
            unused = unused_pool_images(train_set, pool)
            labels = pool.labels.numpy()
            have = np.bincount(labels[unused], minlength=C)
            missing = np.flatnonzero(have == 0)
            if source == "pool" and len(missing):
                raise ValueError(f"analysis.val_source=pool: classes {missing.tolist()[:10]} have no image outside the training "
                                 "set; use analysis.val_source=auto (those classes then use training images) or train")
            val = _subset(pool, _per_class_pick(labels, unused, C, lambda n: min(n, a.val_per_class), cfg.train.seed),
                          f"{pool.name}/unused")
            if not len(missing):
                return Validation(val, "pool", [])
            cand = np.flatnonzero(np.isin(train_labels, missing))
            seen = _subset(train_set, _per_class_pick(train_labels, cand, C, from_train, cfg.train.seed), "")
            both = dataclasses.replace(val, images=torch.cat([val.images, seen.images]), labels=torch.cat([val.labels, seen.labels]),
                                       name=f"{pool.name}/unused+train")
            return Validation(both, "pool+train", missing.tolist())
    idx = _per_class_pick(train_labels, np.arange(len(train_labels)), C, from_train, cfg.train.seed)
    if len(idx) == 0:
        raise ValueError("the training set has no class with 2 or more images to hold out for validation")
    val = _subset(train_set, idx, f"{train_set.name}/val")
    return Validation(val, "train", sorted(set(val.labels.tolist())))


__all__ = ["POOL_DATASETS", "Validation", "unused_pool_images", "validation_split"]
