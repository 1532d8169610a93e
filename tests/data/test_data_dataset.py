"""Class statistics and labels (ride_fast.data.dataset): the long-tail profile, the many / medium /
few splits, label checks."""
import pytest
import torch

from ride_fast.data import ArrayDataset, check_labels, long_tail_counts, split_of_classes


def test_long_tail_profile_matches_cifar100_lt():
    counts = long_tail_counts(500, 100, 100.0)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847


def test_splits_follow_the_protocol():
    masks = split_of_classes([101, 100, 20, 19, 5])
    assert masks["many"].tolist() == [True, False, False, False, False]
    assert masks["medium"].tolist() == [False, True, True, False, False]
    assert masks["few"].tolist() == [False, False, False, True, True]
    cifar = split_of_classes(long_tail_counts(500, 100, 100.0))
    assert [int(m.sum()) for m in cifar.values()] == [35, 35, 30]


def test_labels_out_of_range_are_reported():
    with pytest.raises(ValueError, match=r"label 10 at index 2 is out of range for 10 classes"):
        check_labels(torch.tensor([0, 9, 10, -1]), 10, "x")
    with pytest.raises(ValueError, match="out of range"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), 3, (0.5,), (0.5,), "tiny")
    with pytest.raises(TypeError, match="integers"):
        check_labels(torch.tensor([0.0, 1.0]), 3)
