"""CIFAR-10-LT / CIFAR-100-LT from the standard python pickle files the user has.

Selection exactly as the original LDAM-DRW / RIDE code: numpy's global seed set once (0), then for
classes 0..C-1 in order: idx = indices of the class, np.random.shuffle(idx), keep idx[:n_i] with
n_i = int(n_max * (1/f)^(i/(C-1))). With C = 100, f = 100: 10,847 images, 500 -> 5 per class.
The test set is the full balanced one. Nothing is ever downloaded.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ride_fast.data.dataset import ArrayDataset, long_tail_counts

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


_ARCHIVE = {10: "cifar-10-python.tar.gz", 100: "cifar-100-python.tar.gz"}  # "CIFAR-10/100 python version"


def _read_pickles(folder: Path, names: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        except (KeyError, TypeError, pickle.UnpicklingError, EOFError, ValueError):
            raise ValueError(f"{path}: not a CIFAR python pickle (expected a dict with {b'data'!r} and {label_key!r}); "
                             f"extract it again from {_ARCHIVE[100 if label_key == b'fine_labels' else 10]}") from None
    return np.concatenate(images), np.concatenate(labels)


def _cifar_folder(root: Path, num_classes: int) -> Path:
    """The folder holding the pickles: ROOT/cifar-100-python (cifar-10-batches-py), or ROOT itself
    when it is that folder; otherwise an error that names the folder and files expected in ROOT."""
    sub, train_names, test_names, _ = _LAYOUT[num_classes]
    names = train_names + test_names
    for folder in (root / sub, root):
        if all((folder / n).is_file() for n in names):
            return folder
    folder = root / sub if (root / sub).is_dir() or root.name != sub else root
    missing = [n for n in names if not (folder / n).is_file()]
    lines = [f"data.root={root}: no CIFAR-{num_classes} data: {folder} lacks {', '.join(missing)}",
             f"data.root must hold the folder {sub}/ with {', '.join(names)} (the python version of CIFAR-{num_classes}: "
             f"extract {_ARCHIVE[num_classes]} into data.root, e.g. `tar -xzf {_ARCHIVE[num_classes]} -C {root}`)"]
    other = 10 if num_classes == 100 else 100
    if (root / _LAYOUT[other][0]).is_dir() or root.name == _LAYOUT[other][0]:
        lines.append(f"{root} holds the CIFAR-{other} data ({_LAYOUT[other][0]}): for it set data.name=cifar{other}_lt")
    raise FileNotFoundError("; ".join(lines))


def build_cifar_lt(root: str | Path, num_classes: int = 100, imbalance_factor: float = 100.0, seed: int = 0):
    """Return (train, test) ArrayDatasets of CIFAR-{10,100}-LT read from `root`."""
    if num_classes not in _LAYOUT:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    _, train_names, test_names, key = _LAYOUT[num_classes]
    folder = _cifar_folder(Path(root), num_classes)
    x_train, y_train = _read_pickles(folder, train_names, key)
    x_test, y_test = _read_pickles(folder, test_names, key)
    n_max = len(y_train) // num_classes
    counts = long_tail_counts(n_max, num_classes, imbalance_factor)
    np.random.seed(seed)  # the original sets numpy's global seed once, then shuffles class by class
    keep = []
    for c, n in zip(np.unique(y_train), counts):
        idx = np.flatnonzero(y_train == c)
        np.random.shuffle(idx)
        keep.append(idx[:n])
    keep = np.concatenate(keep)

    def make(x, y, name, rotate):
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), num_classes, CIFAR_MEAN, CIFAR_STD, name, flip=True, rotate=rotate)

    return make(x_train[keep], y_train[keep], f"cifar{num_classes}_lt/train", 15.0), make(x_test, y_test, f"cifar{num_classes}_lt/test", 0.0)
