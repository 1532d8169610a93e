"""MNIST-LT (ride_fast.data.mnist_lt): real digits, long-tailed, reproducible; CSV errors name the line."""
import gzip

import numpy as np
import pytest
import torch

from ride_fast.data.mnist_lt import build_mnist_lt, read_mnist_csv


def test_mnist_lt_is_long_tailed_real_data():
    train, test = build_mnist_lt()
    counts = train.class_counts()
    assert counts.tolist() == [400, 239, 143, 86, 51, 30, 18, 11, 6, 4]
    assert np.bincount(test.labels.numpy()).tolist() == [100] * 10
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == torch.uint8
    assert train.images.float().std() > 50  # real digits, not blank padding
    # held-out test images are disjoint from the training images
    tr = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in tr for x in test.images)
    again, _ = build_mnist_lt()
    assert torch.equal(again.images, train.images)  # fixed seed: same selection


def test_mnist_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "digits.csv.gz"
    good = ",".join(["0"] * 784 + ["3"])
    with gzip.open(path, "wt") as fh:
        fh.write(good + "\n" + "1,2,3\n")
    with pytest.raises(ValueError, match=r"digits\.csv\.gz:2: expected 785"):
        read_mnist_csv(path)
