"""Data sets held in memory: the long-tail profile and the many / medium / few splits, MNIST-LT,
CIFAR-LT from its python files, label checks, the in-memory loader and its augmentations."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from ride_fast.config import DataConfig
from ride_fast.data import ArrayDataset, InMemoryLoader, build_datasets, check_labels, long_tail_counts, split_of_classes
from ride_fast.data.cifar import build_cifar_lt
from ride_fast.data.mnist_lt import build_mnist_lt, read_mnist_csv
from ride_fast.data.transforms import random_crop, random_hflip, random_rotate


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


def _fake_cifar(root, n_per_class=50, num_classes=100):
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.RandomState(1)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    rng.shuffle(labels)
    data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, fh)
    with open(folder / "test", "wb") as fh:
        pickle.dump({b"data": data[:200], b"fine_labels": labels[:200].tolist()}, fh)
    return labels, data


def test_cifar_lt_selection_is_the_original(tmp_path):
    labels, data = _fake_cifar(tmp_path)
    train, test = build_cifar_lt(tmp_path, 100, 10.0)
    counts = long_tail_counts(50, 100, 10.0)
    assert train.class_counts().tolist() == counts
    # independent transcription of the original selection
    np.random.seed(0)
    keep = []
    for c in range(100):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[: counts[c]])
    assert torch.equal(train.images, torch.from_numpy(data[keep].reshape(-1, 3, 32, 32)))
    assert len(test) == 200


def test_cifar_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train not found"):
        build_cifar_lt(tmp_path, 100)
    with pytest.raises(ValueError, match="data.root"):
        build_datasets(DataConfig(name="cifar100_lt"))
    with pytest.raises(ValueError, match="did you mean 'mnist_lt'"):
        build_datasets(DataConfig(name="mnist-lt"))


def test_labels_out_of_range_are_reported():
    with pytest.raises(ValueError, match=r"label 10 at index 2 is out of range for 10 classes"):
        check_labels(torch.tensor([0, 9, 10, -1]), 10, "x")
    with pytest.raises(ValueError, match="out of range"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), 3, (0.5,), (0.5,), "tiny")
    with pytest.raises(TypeError, match="integers"):
        check_labels(torch.tensor([0.0, 1.0]), 3)


def test_loader_covers_each_image_once_and_is_reproducible():
    train, test = build_mnist_lt()
    loader = InMemoryLoader(test, 300, train=False)
    labels = torch.cat([b.labels for b in loader])
    assert torch.equal(labels, test.labels)  # every test image once, in order, last batch partial
    tl = InMemoryLoader(train, 128, train=True, seed=3)
    tl.set_epoch(2)
    a = [b.images for b in tl]
    tl.set_epoch(2)
    b = [b.images for b in tl]
    tl.set_epoch(3)
    c = [b.images for b in tl]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    batch = next(iter(InMemoryLoader(train, 16, train=True, channels_last=True)))
    assert batch.images.shape == (16, 3, 32, 32) and batch.images.is_contiguous(memory_format=torch.channels_last)


def test_training_loader_never_yields_a_single_image_batch():
    ds = ArrayDataset(torch.zeros(9, 1, 8, 8, dtype=torch.uint8), torch.zeros(9, dtype=torch.long), 2, (0.5,), (0.5,))
    sizes = [b.labels.numel() for b in InMemoryLoader(ds, 4, train=True)]
    assert sizes == [4, 4]


def test_augmentations_keep_content():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    crop = random_crop(x, 4, gen)
    assert crop.shape == x.shape
    # each crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        found = any(torch.equal(crop[i], padded[i, :, r : r + 32, c : c + 32]) for r in range(9) for c in range(9))
        assert found
    flipped = random_hflip(x, gen)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1)) for i in range(8))
    still = random_rotate(x, 0.0, gen)
    assert torch.allclose(still, x)
    rot = random_rotate(x, 15.0, gen)
    assert rot.shape == x.shape and not torch.allclose(rot, x)
