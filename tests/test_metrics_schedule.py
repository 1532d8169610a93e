import math

import numpy as np
import pytest
import torch

from ride_fast.engine.metrics import per_class_accuracy, split_accuracy
from ride_fast.engine.schedule import lr_multiplier


def test_cifar_schedule():
    m = lambda e: lr_multiplier(e, 5, (160, 180), 0.01)  # noqa: E731
    assert [m(e) for e in (1, 2, 5, 6, 160)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert m(161) == pytest.approx(0.01) and m(180) == pytest.approx(0.01) and m(181) == pytest.approx(1e-4)
    assert lr_multiplier(1, 0, (), 0.1) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(0, 5, (), 0.1)


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
