"""CIFAR-10-LT / CIFAR-100-LT from the standard pickles (the real layout), original selection."""
import pickle

import numpy as np
import pytest
import torch

from ride_fast.config import DataConfig
from ride_fast.data import build_datasets, long_tail_counts
from ride_fast.data.cifar import CIFAR_MEAN, build_cifar_lt


def _fake_cifar10(root, n_per_class=30):
    """cifar-10-batches-py: data_batch_1..5 + test_batch, each {b'data': [n, 3072] uint8, b'labels': list}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(2)
    labels = np.repeat(np.arange(10), n_per_class)
    rng.shuffle(labels)
    data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        with open(folder / f"data_batch_{b}", "wb") as fh:
            pickle.dump({b"batch_label": b"training batch", b"labels": labels[part].tolist(), b"data": data[part],
                         b"filenames": [b"x.png"] * len(part)}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"labels": labels[:50].tolist(), b"data": data[:50]}, fh)
    return labels, data


def test_cifar10_lt_selection_counts_and_layout(tmp_path):
    labels, data = _fake_cifar10(tmp_path)
    train, test = build_datasets(DataConfig(name="cifar10_lt", root=str(tmp_path), imbalance_factor=10.0))
    counts = long_tail_counts(30, 10, 10.0)
    assert train.class_counts().tolist() == counts and counts[0] == 30 and counts[-1] == 3
    np.random.seed(0)
    keep = []
    for c in range(10):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[: counts[c]])
    assert torch.equal(train.images, torch.from_numpy(data[keep].reshape(-1, 3, 32, 32)))
    assert len(test) == 50 and train.mean == CIFAR_MEAN and train.rotate == 15.0 and test.rotate == 0.0
    # the folder itself may be given as data.root
    again, _ = build_cifar_lt(tmp_path / "cifar-10-batches-py", 10, 10.0)
    assert torch.equal(again.images, train.images)


def test_broken_cifar_pickle_is_named(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle at all")
    (folder / "test").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cifar-100-python/train: not a CIFAR python pickle"):
        build_cifar_lt(tmp_path, 100)
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)  # no b"fine_labels"
    with pytest.raises(ValueError, match=r"not a CIFAR python pickle \(expected a dict with b'data' and b'fine_labels'\); "
                                         r"extract it again from cifar-100-python.tar.gz"):
        build_cifar_lt(tmp_path, 100)


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
    with pytest.raises(FileNotFoundError) as info:
        build_cifar_lt(tmp_path, 100)
    assert str(info.value) == (
        f"data.root={tmp_path}: no CIFAR-100 data: {tmp_path / 'cifar-100-python'} lacks train, test; data.root must hold "
        "the folder cifar-100-python/ with train, test (the python version of CIFAR-100: extract cifar-100-python.tar.gz "
        f"into data.root, e.g. `tar -xzf cifar-100-python.tar.gz -C {tmp_path}`)")
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py lacks data_batch_2, data_batch_3, data_batch_4, "
                                                r"data_batch_5, test_batch; data.root must hold the folder cifar-10-batches-py/"):
        build_cifar_lt(tmp_path, 10)
    with pytest.raises(FileNotFoundError, match=r"holds the CIFAR-10 data \(cifar-10-batches-py\): for it set data.name=cifar10_lt"):
        build_cifar_lt(tmp_path, 100)  # the other CIFAR is there
    (tmp_path / "damaged").mkdir()
    _fake_cifar10(tmp_path / "damaged")
    (tmp_path / "damaged" / "cifar-10-batches-py" / "test_batch").write_text("not a pickle")
    with pytest.raises(ValueError) as info:
        build_cifar_lt(tmp_path / "damaged", 10)
    assert str(info.value).startswith(f"{tmp_path / 'damaged' / 'cifar-10-batches-py' / 'test_batch'}: not a CIFAR python pickle")
    assert "Error" not in str(info.value)
    with pytest.raises(ValueError, match="data.root"):
        build_datasets(DataConfig(name="cifar100_lt"))
    with pytest.raises(ValueError, match="did you mean 'mnist_lt'"):
        build_datasets(DataConfig(name="mnist-lt"))
