"""Index samplers: which images each rank loads in an epoch, in which order.

Shape legend: N images in the data set, C classes, R ranks (world size), n per-rank epoch length.

Every sampler is deterministic in (seed, epoch): call `set_epoch(e)` before each epoch and a
resumed run sees the same order. All ranks draw the same global sequence from the same generator
and each keeps its own slice (positions rank, rank + R, rank + 2R, ...), so the ranks' shares are
disjoint without any communication.

    sampler.set_epoch(e)
    idx = sampler.indices()     # [n] int64 numpy array for this rank and epoch
    len(sampler) == n           # the same n on every rank for training samplers

Any object with `set_epoch(int)`, `indices() -> np.ndarray` and `__len__` can be passed as the
`sampler=` of the loaders in ride_fast.data.
"""
from __future__ import annotations

import numpy as np


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """A numpy generator for (seed, epoch, *stream): independent streams, reproducible anywhere."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), *map(int, stream)])))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size): got rank={rank}, world_size={world_size}")


class ShuffleSampler:
    """A random permutation of the data set per epoch (training) or the data-set order (evaluation),
    split over `world_size` ranks.

    With `pad=True` (the default when shuffling) the global sequence is padded by repeating its first
    images so that every rank gets the same number (ceil(N / R)); synchronous data-parallel
    training needs equal step counts. With `pad=False` (the default for evaluation) every image is
    visited exactly once over all ranks and the ranks' lengths differ by at most one.
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool | None = None):
        _check_rank(rank, world_size)
        if size < 0:
            raise ValueError(f"data set size must be >= 0, got {size}")
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = shuffle if pad is None else pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def indices(self) -> np.ndarray:
        order = epoch_rng(self.seed, self.epoch, 0).permutation(self.size) if self.shuffle else np.arange(self.size)
        if self.pad and self.size and self.size % self.world_size:
            extra = self.world_size - self.size % self.world_size
            order = np.concatenate([order, np.resize(order, extra)])
        return order[self.rank :: self.world_size].astype(np.int64, copy=False)

    def __iter__(self):
        return iter(self.indices().tolist())


class ClassBalancedSampler:
    """The class-balanced sampler of RIDE's stage 2 (the original's `BalancedSampler`,
    retain_epoch_size=True): each draw picks a class uniformly at random, then the next image of that
    class's shuffled list (reshuffled whenever it wraps around). An epoch has `num_samples` draws
    (default: the data-set size N), shared out over the ranks like ShuffleSampler (padded).

    Difference from the original, for exact resume: the class lists are reshuffled and their pointers
    reset at the start of every epoch from (seed, epoch), instead of carrying over from the previous
    epoch. The distribution of the draws is the same.

    labels: [N] integer class of each image; classes with no image are never drawn.
    """

    def __init__(self, labels, num_classes: int | None = None, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_samples: int | None = None):
        _check_rank(rank, world_size)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0:
            raise ValueError("ClassBalancedSampler needs at least one labelled image")
        if labels.min() < 0:
            raise ValueError(f"ClassBalancedSampler: negative label {int(labels.min())}")
        num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.max() >= num_classes:
            raise ValueError(f"ClassBalancedSampler: label {int(labels.max())} out of range for {num_classes} classes")
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes)
        self.buckets = [b for b in np.split(order, np.cumsum(counts)[:-1]) if len(b)]  # image indices per non-empty class
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def global_indices(self) -> np.ndarray:
        """The whole epoch's draws [len * R], before the split over ranks (the same on every rank)."""
        rng = epoch_rng(self.seed, self.epoch, 1)
        total = len(self) * self.world_size
        classes = rng.integers(0, len(self.buckets), size=total)  # uniform over non-empty classes
        out = np.empty(total, dtype=np.int64)
        positions = np.argsort(classes, kind="stable")  # draw positions grouped by class, in draw order
        draws = np.bincount(classes, minlength=len(self.buckets))
        ends = np.cumsum(draws)
        for k in np.flatnonzero(draws):
            where = positions[ends[k] - draws[k] : ends[k]]
            bucket = self.buckets[k]
            cycles = -(-len(where) // len(bucket))  # reshuffle the class list at every wrap-around
            seq = np.concatenate([rng.permutation(bucket) for _ in range(cycles)])
            out[where] = seq[: len(where)]
        return out

    def indices(self) -> np.ndarray:
        return self.global_indices()[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices().tolist())


def batch_indices(indices: np.ndarray, batch_size: int, *, drop_single: bool = False) -> list[np.ndarray]:
    """Cut an index sequence into batches of `batch_size` (the last one may be smaller). With
    `drop_single`, a last batch of one image is dropped (BatchNorm cannot train on it)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if drop_single and batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def num_batches(n: int, batch_size: int, *, drop_single: bool = False) -> int:
    """len(batch_indices(...)) for n indices, without building them."""
    if drop_single and n > 1 and n % batch_size == 1:
        return n // batch_size
    return -(-n // batch_size)


__all__ = ["ClassBalancedSampler", "ShuffleSampler", "batch_indices", "epoch_rng", "num_batches"]
