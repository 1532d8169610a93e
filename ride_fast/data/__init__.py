"""Data sets, batched augmentation and loaders; every loader yields the same `Batch` type.

Data knows nothing about models: it hands out images, labels and class statistics.
"""
from __future__ import annotations

from ride_fast.data.dataset import (
    SPLITS,
    ArrayDataset,
    Batch,
    check_labels,
    long_tail_counts,
    split_of_classes,
)
from ride_fast.data.loader import InMemoryLoader

DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")


def build_datasets(cfg) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) for a `DataConfig`."""
    if cfg.name == "mnist_lt":
        from ride_fast.data.mnist_lt import build_mnist_lt

        return build_mnist_lt(cfg.imbalance_factor, cfg.test_per_class, cfg.seed)
    if cfg.name in ("cifar10_lt", "cifar100_lt"):
        from ride_fast.data.cifar import build_cifar_lt

        if not cfg.root:
            raise ValueError(f"data.root must name the folder holding the CIFAR python files for data.name={cfg.name}")
        return build_cifar_lt(cfg.root, 10 if cfg.name == "cifar10_lt" else 100, cfg.imbalance_factor, cfg.seed)
    import difflib

    close = difflib.get_close_matches(cfg.name, DATASETS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"data.name: unknown data set '{cfg.name}'{hint}; known: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "SPLITS",
    "ArrayDataset",
    "Batch",
    "InMemoryLoader",
    "build_datasets",
    "check_labels",
    "long_tail_counts",
    "split_of_classes",
]
