"""Class-count derived quantities: hand-checked values and validation errors."""
import math

import numpy as np
import pytest
import torch

from ride_fast.losses import class_balanced_weights, diversity_temperatures, ldam_margins, validate_class_counts


def test_ldam_margins_by_hand():
    # counts [100, 1]: n^-1/4 = [1/sqrt(10), 1]; the rarest class gets max_m = 0.5,
    # the head 0.5 / 100^0.25 = 0.5 / sqrt(10) = 0.158113...
    m = ldam_margins([100, 1], max_m=0.5)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, torch.tensor([0.5 / math.sqrt(10.0), 0.5], dtype=torch.float64))
    # counts [16, 1, 81]: n^-1/4 = [1/2, 1, 1/3] -> times 0.3 / 1
    torch.testing.assert_close(ldam_margins([16, 1, 81], max_m=0.3), torch.tensor([0.15, 0.3, 0.1], dtype=torch.float64))


def test_class_balanced_weights_by_hand():
    # beta = 0.5, counts [1, 2]: raw w = 0.5/(1-0.5) = 1, 0.5/(1-0.25) = 2/3; sum = 5/3 -> scale to 2:
    # [1 * 6/5, 2/3 * 6/5] = [1.2, 0.8]
    torch.testing.assert_close(class_balanced_weights([1, 2], beta=0.5), torch.tensor([1.2, 0.8], dtype=torch.float64))
    # beta = 0: all ones
    torch.testing.assert_close(class_balanced_weights([5, 50, 500], beta=0.0), torch.ones(3, dtype=torch.float64))
    w = class_balanced_weights([500, 100, 20, 5], beta=0.9999)
    assert w.sum().item() == pytest.approx(4.0)
    assert torch.all(w[1:] > w[:-1])  # rarer classes weigh more


def test_diversity_temperatures_by_hand():
    # counts [3, 1], gamma = 0.5: p = [3/4, 1/4]; t = 2 * p * 0.5 + 0.5 = [1.25, 0.75]; / 1.25 = [1, 0.6]
    torch.testing.assert_close(diversity_temperatures([3, 1], 0.5), torch.tensor([1.0, 0.6], dtype=torch.float64))
    # gamma = 0: all ones; balanced counts: all ones for any gamma
    torch.testing.assert_close(diversity_temperatures([7, 1, 2], 0.0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(diversity_temperatures([4, 4, 4], 0.9), torch.ones(3, dtype=torch.float64))


def test_diversity_temperatures_must_be_positive():
    with pytest.raises(ValueError, match="too large"):
        diversity_temperatures([1000, 1], 5.0)  # t = 2 p 5 - 4 -> tail negative


def test_validate_class_counts_accepts_sequences_arrays_tensors():
    for counts in ([3, 1], np.array([3, 1]), torch.tensor([3, 1]), np.array([3.0, 1.0])):
        out = validate_class_counts(counts)
        assert out.dtype == np.int64 and out.tolist() == [3, 1]


@pytest.mark.parametrize(
    "counts, match",
    [
        ([5, 0, 3, 0], r"class index\(es\) \[1, 3\] have zero training images"),
        ([5, -2, 3], r"class index\(es\) \[1\] have negative counts \[-2\]"),
        ([[5, 3], [2, 1]], "1-D"),
        ([7], "at least 2 classes"),
        ([5.0, 2.5], "whole numbers"),
        (["a", "b"], "integers"),
        ([True, False], "integers"),
    ],
)
def test_validate_class_counts_errors(counts, match):
    with pytest.raises(ValueError, match=match):
        validate_class_counts(counts)


def test_zero_count_error_reaches_the_losses():
    from ride_fast.losses import LDAMLoss, RIDELoss

    with pytest.raises(ValueError, match=r"\[2\] have zero"):
        RIDELoss([10, 5, 0])
    with pytest.raises(ValueError, match=r"\[0\] have zero"):
        LDAMLoss([0, 5])
