"""Accuracy overall and per many/medium/few split, computed with bincount (no per-image loops).

Shape legend: N test images, C classes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ride_fast.data.dataset import SPLITS, split_of_classes


@dataclass
class SplitAccuracy:
    """Top-1 accuracy in percent: overall over images, splits as mean per-class accuracy."""

    overall: float
    many: float
    medium: float
    few: float
    per_class: list[float] = field(default_factory=list)  # [C] percent (nan: class absent from test)

    def as_dict(self, with_per_class: bool = False) -> dict:
        out = {"overall": self.overall, "many": self.many, "medium": self.medium, "few": self.few}
        if with_per_class:
            out["per_class"] = self.per_class
        return out


def pct(value: float, spec: str = ".2f") -> str:
    """An accuracy as `format(value, spec)`, or "n/a" at the same width for a split that holds no
    test class (NaN; JSON writes null)."""
    if not math.isnan(value):
        return format(value, spec)
    width = re.match(r"[<>^]?(\d*)", spec).group(1)
    return format("n/a", f">{width}") if width else "n/a"


def per_class_accuracy(preds: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(correct [C], total [C]) counts, on the device of the inputs."""
    correct = torch.bincount(labels[preds == labels], minlength=num_classes)
    total = torch.bincount(labels, minlength=num_classes)
    return correct, total


def split_accuracy(correct, total, class_counts) -> SplitAccuracy:
    """Turn per-class (correct, total) counts into overall and split accuracies."""
    correct = np.asarray(torch.as_tensor(correct).cpu(), dtype=np.float64)
    total = np.asarray(torch.as_tensor(total).cpu(), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = 100.0 * correct / total
    masks = split_of_classes(class_counts)
    result = {}
    for name in SPLITS:
        sel = masks[name] & (total > 0)
        result[name] = float(acc[sel].mean()) if sel.any() else float("nan")
    overall = 100.0 * correct.sum() / max(total.sum(), 1.0)
    return SplitAccuracy(overall=float(overall), per_class=[float(a) for a in acc], **result)
