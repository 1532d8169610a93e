"""Per-class accuracy and the many / medium / few split means (ride_fast.engine.metrics)."""
import math

import numpy as np
import pytest
import torch
from _dispatch import CountOps, host_reads

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


def test_an_empty_split_prints_as_n_a_at_the_same_width():
    """A split without test classes is NaN in SplitAccuracy (null in JSON) and "n/a" on the console,
    padded like a number so that tables stay aligned."""
    from ride_fast.engine.metrics import pct

    acc = split_accuracy(torch.tensor([5, 3]), torch.tensor([10, 10]), [500, 400])  # every class "many"
    assert acc.few != acc.few
    assert pct(acc.few, ">8.2f") == "     n/a" and pct(acc.many, ">8.2f") == "   40.00"
    assert pct(acc.few, "5.1f") == "  n/a" and pct(acc.few) == "n/a" and pct(12.345) == "12.35"


def test_per_class_counts_match_bincount_and_read_nothing_back():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (200,), generator=g)
    preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 7, (200,), generator=g))
    with CountOps() as ops:
        correct, total = per_class_accuracy(preds, labels, 9)  # classes 7 and 8 absent: zero counts
    assert correct.dtype == total.dtype == torch.long
    assert torch.equal(total, torch.bincount(labels, minlength=9))
    assert torch.equal(correct, torch.bincount(labels[preds == labels], minlength=9))
    assert not host_reads(ops.names), ops.names


def test_evaluation_loop_reads_nothing_back_per_batch():
    """evaluate_model's loop over batches waits for no device value: one read at the end."""
    from ride_fast.data import Batch
    from ride_fast.engine.evaluate import evaluate_model
    from ride_fast.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=5, num_experts=2)
    loader = [Batch(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 4])) for _ in range(3)]
    counts = [10, 8, 6, 4, 2]
    reference = evaluate_model(model, loader, counts, device=torch.device("cpu"), prefetch=False)
    with CountOps() as ops:
        acc = evaluate_model(model, loader, counts, device=torch.device("cpu"), prefetch=False)
    np.testing.assert_equal(vars(acc), vars(reference))  # NaN for a split without a test class
    assert not host_reads(ops.names), sorted(set(ops.names))
