"""Data sets, batched augmentation, samplers and loaders; every loader yields the same `Batch` type.

Data knows nothing about models: it hands out images, labels and class statistics. NVIDIA DALI is
imported only when a DALI loader is built (ride_fast.data.dali).

    train_set, test_set = build_datasets(cfg.data)          # checked; DataError names file:line
    train_loader, test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last, seed,
                                              rank=0, world_size=1, train_sampler="shuffle")
    for epoch in ...:
        train_loader.set_epoch(epoch)
        for batch in train_loader:                           # Batch(images [B, 3, S, S], labels [B])
            ...
"""
from __future__ import annotations

from ride_fast.data.dataset import (
    SPLITS,
    ArrayDataset,
    Batch,
    DataError,
    Problem,
    check_labels,
    long_tail_counts,
    split_of_classes,
)
from ride_fast.data.factory import DATASETS, LOADERS, build_datasets, build_loaders, choose_loader
from ride_fast.data.image_list import ImageListDataset, ImageRecipe
from ride_fast.data.loader import InMemoryLoader
from ride_fast.data.samplers import ClassBalancedSampler, ShuffleSampler

__all__ = [
    "DATASETS",
    "LOADERS",
    "SPLITS",
    "ArrayDataset",
    "Batch",
    "ClassBalancedSampler",
    "DataError",
    "ImageListDataset",
    "ImageRecipe",
    "InMemoryLoader",
    "Problem",
    "ShuffleSampler",
    "build_datasets",
    "build_loaders",
    "check_labels",
    "choose_loader",
    "long_tail_counts",
    "split_of_classes",
]
