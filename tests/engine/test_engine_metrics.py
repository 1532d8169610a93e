"""Per-class accuracy and the many / medium / few split means (ride_fast.engine.metrics)."""
import math

import numpy as np
import pytest
import torch

from ride_fast.engine.metrics import per_class_accuracy, split_accuracy


def test_split_accuracy_by_hand():
    # 3 classes: counts many / medium / few
    counts = [200, 50, 5]
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 0, 2, 0])
    correct, total = per_class_accuracy(preds, labels, 3)
    assert correct.tolist() == [1, 2, 1] and total.tolist() == [2, 4, 2]
    acc = split_accuracy(correct, total, counts)
    assert acc.overall == pytest.approx(100 * 4 / 8)
    assert (acc.many, acc.medium, acc.few) == (pytest.approx(50.0), pytest.approx(50.0), pytest.approx(50.0))
    assert acc.per_class == [50.0, 50.0, 50.0]


def test_split_mean_is_per_class_not_per_image():
    counts = [200, 300, 5]
    labels = torch.tensor([0] * 10 + [1] * 2 + [2])
    preds = torch.tensor([0] * 10 + [0, 0] + [2])
    acc = split_accuracy(*per_class_accuracy(preds, labels, 3), counts)
    assert acc.many == pytest.approx(50.0)  # (100% + 0%) / 2, not 10/12
    assert acc.medium != acc.medium or math.isnan(acc.medium)  # no medium class: nan
    assert np.isclose(acc.few, 100.0)
