"""In-memory long-tailed data sets, class statistics, the many/medium/few splits, the Batch every
loader yields, and the Problem / DataError types that report bad data (file and line).

Shape legend: N images, C classes, H x W pixels, K image channels (1 grey, 3 colour).

    images  [N, K, H, W] uint8   kept compact; batches are normalised to float on the device
    labels  [N]          int64
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Split thresholds of the RIDE / OLTR protocol (counts of training images per class).
MANY_SHOT_MIN = 100  # many: n > 100
FEW_SHOT_MAX = 20  # few: n < 20; medium: 20 <= n <= 100
SPLITS = ("many", "medium", "few")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set, with a message that names the file (and line) to fix."""

    kind: str  # malformed | label | missing | unreadable | empty_class | unsupported | split
    message: str
    index: int = -1  # position of the image in its data set, for problems of one image
    split: str = ""  # "train" or "test"

    @property
    def skippable(self) -> bool:
        """Missing and unreadable images can be left out (data.skip_bad_images=true)."""
        return self.kind in ("missing", "unreadable")


class DataError(ValueError):
    """A data set that cannot be used as it is; the message lists the problems (file:line: what)."""

    MAX_LISTED = 20

    def __init__(self, problems: list[Problem], header: str = "the data set has problems"):
        self.problems = list(problems)
        lines = [p.message for p in self.problems[: self.MAX_LISTED]]
        more = len(self.problems) - len(lines)
        if more:
            lines.append(f"... and {more} more (`ride-fast data check --config X` lists them all)")
        super().__init__(f"{header} ({len(self.problems)}):\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class Batch:
    """One batch, whatever loader produced it."""

    images: Tensor  # [B, 3, H, W] float, normalised
    labels: Tensor  # [B] int64


@dataclass
class ArrayDataset:
    """Images and labels held in memory, with the per-channel normalisation of the data set."""

    images: Tensor  # [N, K, H, W] uint8
    labels: Tensor  # [N] int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    flip: bool = True  # horizontal flips are a valid augmentation (not for digits)
    rotate: float = 0.0  # random rotation of +-rotate degrees in training (CIFAR-LT: 15)

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"{self.name}: images must be a uint8 tensor [N, K, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but labels have shape {tuple(self.labels.shape)}"
            )
        check_labels(self.labels, self.num_classes, self.name)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)


def check_labels(labels: Tensor, num_classes: int, where: str = "") -> None:
    """Labels must be integers in [0, num_classes): name the first bad one and its position."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{where}: labels must be integers, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{where}: label {int(labels[i])} at index {i} is out of range for {num_classes} classes "
            f"({bad.numel()} labels out of range in all)"
        )


def split_of_classes(class_counts) -> dict[str, np.ndarray]:
    """Boolean masks [C] of the many (n > 100), medium (20 <= n <= 100) and few (n < 20) classes."""
    counts = np.asarray(class_counts)
    return {
        "many": counts > MANY_SHOT_MIN,
        "medium": (counts >= FEW_SHOT_MAX) & (counts <= MANY_SHOT_MIN),
        "few": counts < FEW_SHOT_MAX,
    }


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile of the LDAM/RIDE CIFAR-LT protocol: n_i = int(n_max * (1/f)^(i/(C-1)))."""
    if imbalance_factor < 1:
        raise ValueError(f"data.imbalance_factor must be >= 1, got {imbalance_factor}")
    return [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0))) for i in range(num_classes)]
