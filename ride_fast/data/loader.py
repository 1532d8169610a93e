"""A loader for data sets held in memory: the whole set sits on the training device as uint8, and
every batch is gathered, augmented and normalised there. For CIFAR/MNIST-size data this keeps a GPU
busy without worker processes; on the CPU it avoids per-image Python work.
"""
from __future__ import annotations

import os

import torch

from ride_fast.data.dataset import ArrayDataset, Batch
from ride_fast.data.samplers import ShuffleSampler, epoch_rng, num_batches
from ride_fast.data.transforms import normalize, random_crop, random_hflip, random_rotate


def cpus_per_rank() -> int:
    """The CPU cores a loader of this process may take (data.num_workers=-1): those the process may
    run on, shared among the ranks a torchrun job starts on this machine (LOCAL_WORLD_SIZE), so that
    eight ranks of an eight-GPU node do not each start a worker per core."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        cpus = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, cpus // ranks_here)


class EpochLoader:
    """What every loader shares: a data set, a batch size, a sampler that orders each epoch (seeded,
    reshuffled by `set_epoch`, split over ranks; default a ShuffleSampler: a permutation per epoch
    in training, the data-set order in evaluation), the epoch and a resume position.

    Subclasses yield `Batch`es. `seekable` loaders derive every random draw from (seed, epoch, rank,
    position), so `set_epoch(e, start_batch=k)` resumes epoch e at batch k with the batches of an
    uninterrupted run; the others (DALI: its crops come from the pipeline's own generator) refuse
    a start batch, and the trainer discards the batches before it instead.
    """

    seekable = True

    def __init__(self, dataset, batch_size: int, *, train: bool, device: torch.device | str = "cpu",
                 augment: bool = True, channels_last: bool = False, seed: int = 0, sampler=None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.seed = seed
        self.sampler = sampler if sampler is not None else ShuffleSampler(len(dataset), shuffle=train, seed=seed)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and draws; the next iteration starts at batch `start_batch`."""
        if start_batch and not self.seekable:
            raise TypeError(f"{type(self).__name__} cannot start an epoch at batch {start_batch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} outside an epoch of {len(self)} batches")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        # training: a last batch of one image would break BatchNorm
        return num_batches(len(self.sampler), self.batch_size, drop_single=self.train)

    @property
    def rank(self) -> int:
        """This process's rank in the sampler's split (0 without one): other ranks, other draws."""
        return getattr(self.sampler, "rank", 0)


class InMemoryLoader(EpochLoader):
    """Iterate over an ArrayDataset in batches of `Batch(images [B, 3, H, W] float, labels [B])`.

    The order comes from the sampler (see EpochLoader), so one process and N ranks with the same
    global batch see the same images per step. Every random draw derives from (seed, epoch, rank,
    batch index): `set_epoch(e)` before each epoch reproduces an epoch exactly, and
    `set_epoch(e, start_batch=k)` resumes it at batch k with the same draws as an uninterrupted
    run (no generator state to save).
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, train: bool, device: torch.device | str = "cpu",
                 augment: bool = True, channels_last: bool = False, seed: int = 0, sampler=None):
        super().__init__(dataset, batch_size, train=train, device=device, augment=augment, channels_last=channels_last,
                         seed=seed, sampler=sampler)
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def _generator(self, batch: int) -> torch.Generator:
        seed = int(epoch_rng(self.seed, self.epoch, 4, self.rank, batch).integers(2**62))
        return torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.from_numpy(self.sampler.indices()).to(self.device, non_blocking=True)
        ds = self.dataset
        start, self.start_batch = self.start_batch, 0  # a resume position applies to one iteration
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self._images.index_select(0, idx).to(torch.get_default_dtype()).div_(255)
            if self.augment:
                gen = self._generator(i)
                x = random_crop(x, 4, gen)
                if ds.flip:
                    x = random_hflip(x, gen)
                if ds.rotate:
                    x = random_rotate(x, ds.rotate, gen)
            x = normalize(x, ds.mean, ds.std)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # grey digits through the RGB stem
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield Batch(images=x, labels=self._labels.index_select(0, idx))
