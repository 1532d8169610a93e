"""Stage-2 data for the engine tests: a balanced 'full training set' of distinct random images and
a long-tailed draw from it, leaving images over for held-out router data and calibration.

Shape legend: N images, C classes.
"""
import dataclasses

import numpy as np
import pytest
import torch

from ride_fast.data import ArrayDataset, InMemoryLoader

C, PX = 6, 8


def pool_data(per_class=20, seed=0) -> ArrayDataset:
    """A balanced 'full training set' of distinct random images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="pool")


def subset(ds, idx, name):
    t = torch.as_tensor(idx, dtype=torch.long)
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


def long_tailed(pool, counts=(20, 12, 8, 5, 3, 2), test_per_class=2):
    """(train, test): class c keeps its first counts[c] pool images (the head keeps all), the test
    set takes the last test_per_class of the classes that leave some over."""
    labels = pool.labels.numpy()
    train_idx, test_idx = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        train_idx += idx[:n].tolist()
        if len(idx) - n >= test_per_class:
            test_idx += idx[-test_per_class:].tolist()
    return subset(pool, train_idx, "train"), subset(pool, test_idx, "test")


@pytest.fixture
def lt_pool():
    """(pool, long-tailed train, test) of `long_tailed(pool_data())`."""
    pool = pool_data()
    return (pool, *long_tailed(pool))


@pytest.fixture
def val_loader():
    """A balanced evaluation loader of 5 images per class, other images than the pool's."""
    return InMemoryLoader(pool_data(5, 3), 8, train=False)
