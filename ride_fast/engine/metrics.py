"""Accuracy overall and per many/medium/few split, computed with per-class counts on the device (no per-image loops, no host reads).

Shape legend: N test images, C classes.
"""
from __future__ import annotations

import functools
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


def count_into(counts: Tensor, index: Tensor, weights: Tensor | None = None) -> Tensor:
    """counts[index[i]] += weights[i] (1 without weights), in place; returns `counts` (int64).

    `index_add_` instead of `bincount`: on a GPU, bincount reads the index's min and max back to the
    host and boolean indexing its count, so a loop of them would wait for the device every batch."""
    ones = torch.ones_like(index, dtype=counts.dtype) if weights is None else weights.to(counts.dtype)
    return counts.index_add_(0, index, ones)


def per_class_accuracy(preds: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(correct [C], total [C]) int64 counts, on the device of the inputs, without a host read."""
    zeros = functools.partial(torch.zeros, num_classes, dtype=torch.long, device=labels.device)
    return count_into(zeros(), labels, preds == labels), count_into(zeros(), labels)


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
