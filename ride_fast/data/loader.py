"""A loader for data sets held in memory: the whole set sits on the training device as uint8, and
every batch is gathered, augmented and normalised there. For CIFAR/MNIST-size data this keeps a GPU
busy without worker processes; on the CPU it avoids per-image Python work.
"""
from __future__ import annotations

import torch

from ride_fast.data.dataset import ArrayDataset, Batch
from ride_fast.data.transforms import normalize, random_crop, random_hflip, random_rotate


class InMemoryLoader:
    """Iterate over an ArrayDataset in batches of `Batch(images [B, 3, H, W] float, labels [B])`.

    Training order is a permutation drawn from (seed, epoch): call `set_epoch(e)` before each epoch,
    so a resumed run sees the same batches. Evaluation keeps the data set order and every image once.
    A `sampler` (ride_fast.data.samplers: sharded over ranks, class-balanced...) replaces that order.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        augment: bool = True,
        channels_last: bool = False,
        seed: int = 0,
        sampler=None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.device = torch.device(device)
        self.augment = augment and train
        self.channels_last = channels_last
        self.seed = seed
        self.sampler = sampler
        self.epoch = 0
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.dataset) if self.sampler is None else len(self.sampler)
        if self.train and n % self.batch_size == 1 and n > 1:
            return n // self.batch_size  # a last batch of one image would break BatchNorm
        return -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        rank = getattr(self.sampler, "rank", 0)  # other ranks: other augmentation draws
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + rank * 1_000_000_007)

    def __iter__(self):
        n = len(self.dataset)
        gen = self._generator()
        if self.sampler is not None:
            order = torch.from_numpy(self.sampler.indices())
        else:
            order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        order = order.to(self.device, non_blocking=True)
        ds = self.dataset
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self._images.index_select(0, idx).float().div_(255)
            if self.augment:
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
