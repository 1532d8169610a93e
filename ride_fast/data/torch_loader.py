"""The torch fallback loader for photo data sets: PIL decoding in DataLoader worker processes,
pinned memory, colour jitter and normalisation batched on the training device.

Shape legend: B images per batch (per rank), S crop size (224), H x W decoded image.

Per image, in a worker: decode with PIL and convert to RGB (grey, CMYK, palette and RGBA images
included), then
  training:   RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3), bilinear; flip with p = 1/2;
  evaluation: resize the shorter side to 256 (bilinear), center crop S;
giving uint8 [S, S, 3]. Per batch, on the device (`transforms.finish_batch`, shared with the DALI
loader): uint8 [B, S, S, 3] -> colour jitter where the recipe has it -> normalised float
[B, 3, S, S] in channels-last memory. These are torchvision's transforms, re-implemented so
torchvision is not needed.

Random numbers come from (seed, epoch, position in the epoch): the result does not depend on the
number of workers. An image that cannot be read stops the run with its path and list line, or
is left out of its batch and counted when `skip_bad_images=True`.
"""
from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from ride_fast.data.dataset import Batch
from ride_fast.data.image_list import ImageListDataset, ImageRecipe
from ride_fast.data.loader import EpochLoader, cpus_per_rank
from ride_fast.data.samplers import batch_indices, epoch_rng
from ride_fast.data.transforms import center_crop_offset, finish_batch, random_resized_crop_box, resize_shorter_size
from ride_fast.data.verify import decode_reason

log = logging.getLogger("ride_fast.data")


class BadImageError(ValueError):
    """An image that PIL cannot decode (the message names the list line and the path)."""


def load_rgb(path: str):
    """Decode an image file to an RGB PIL image (grey, CMYK, palette and alpha images converted)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")  # as torchvision's default loader


def transform_image(im, recipe: ImageRecipe, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    """One RGB PIL image -> uint8 [S, S, 3] (training crop + flip, or evaluation resize + crop)."""
    from PIL import Image

    S = recipe.crop_size
    W, H = im.size
    if train:
        top, left, h, w = random_resized_crop_box(W, H, rng, recipe.scale, recipe.ratio)
        im = im.crop((left, top, left + w, top + h)).resize((S, S), Image.BILINEAR)
        if recipe.flip and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        nw, nh = resize_shorter_size(W, H, recipe.resize_size)
        im = im.resize((nw, nh), Image.BILINEAR)
        top, left = center_crop_offset(nh, S), center_crop_offset(nw, S)
        im = im.crop((left, top, left + S, top + S))
    return np.asarray(im, dtype=np.uint8)


class _DecodeTask(torch.utils.data.Dataset):
    """Map-style view for the DataLoader: item (epoch, position, index) -> (uint8 [S, S, 3] or None,
    index, error). The epoch travels with each item, so persistent workers serve every epoch."""

    def __init__(self, dataset: ImageListDataset, train: bool, seed: int, skip_bad: bool):
        self.files = dataset.files
        self.where = dataset.where
        self.recipe = dataset.recipe
        self.train = train
        self.seed = seed
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        epoch, pos, i = item
        rng = epoch_rng(self.seed, epoch, 2, pos, i) if self.train else None
        try:
            im = load_rgb(self.files[i])
        except Exception as err:
            where = self.where(i)
            msg = f"{where}: cannot decode ({decode_reason(err)}): {self.files[i]}" if where != self.files[i] \
                else f"{self.files[i]}: cannot decode ({decode_reason(err)})"
            if not self.skip_bad:
                raise BadImageError(msg + " (data.skip_bad_images=true leaves such images out)") from None
            return None, i, msg
        return transform_image(im, self.recipe, self.train, rng), i, ""


class _EpochBatches:
    """The DataLoader's batch sampler: the owning loader's batches for its current epoch."""

    def __init__(self, owner: "TorchImageLoader"):
        self.owner = weakref.ref(owner)  # no reference cycle: the workers stop when the loader goes

    def __iter__(self):
        return iter(self.owner()._batches())

    def __len__(self) -> int:
        return len(self.owner())


def _collate(items):
    """-> (uint8 [B, S, S, 3], indices [B] int64, error messages of left-out images)."""
    good = [(x, i) for x, i, _ in items if x is not None]
    errors = [e for x, _, e in items if x is None]
    if not good:
        return None, torch.empty(0, dtype=torch.int64), errors
    images = torch.from_numpy(np.stack([x for x, _ in good]))
    return images, torch.tensor([i for _, i in good], dtype=torch.int64), errors


class TorchImageLoader(EpochLoader):
    """Batches of `Batch(images [B, 3, S, S] float normalised, labels [B])` from an ImageListDataset.

    `sampler` gives this rank's indices per epoch (see EpochLoader). `num_workers=0` decodes in
    the calling process. Every draw derives from (seed, epoch, rank, position), so
    `set_epoch(e, start_batch=k)` resumes mid-epoch with the batches of an uninterrupted epoch.
    """

    def __init__(self, dataset: ImageListDataset, batch_size: int, *, train: bool, device="cpu",
                 channels_last: bool = False, seed: int = 0, sampler=None, num_workers: int = -1,
                 pin_memory: bool | None = None, skip_bad_images: bool = False, augment: bool = True,
                 prefetch_factor: int = 4):
        super().__init__(dataset, batch_size, train=train, device=device, augment=augment, channels_last=channels_last,
                         seed=seed, sampler=sampler)
        self.num_workers = cpus_per_rank() if num_workers < 0 else num_workers
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.skip_bad_images = skip_bad_images
        self.prefetch_factor = prefetch_factor
        self._first = 0  # the batch the current iteration started at
        self.skipped = 0  # images left out since the loader was made (skip_bad_images)
        self._loader = None

    def _batches(self) -> list[list[tuple[int, int, int]]]:
        """This epoch's batches of (epoch, position in the epoch, image index)."""
        idx = self.sampler.indices()
        pos = np.arange(len(idx))
        return [[(self.epoch, p, i) for p, i in zip(b.tolist(), idx[b].tolist())]
                for b in batch_indices(pos, self.batch_size, drop_single=self.train)[self._first:]]

    def _dataloader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the loader's life: its worker processes persist across epochs."""
        if self._loader is None:
            kw = {}
            if self.num_workers > 0:
                kw = dict(prefetch_factor=self.prefetch_factor, persistent_workers=True)
            task = _DecodeTask(self.dataset, self.augment, self.seed, self.skip_bad_images)
            self._loader = torch.utils.data.DataLoader(task, batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                                                       collate_fn=_collate, pin_memory=self.pin_memory, **kw)
        return self._loader

    def __iter__(self):
        if len(self) == 0:
            return
        loader = self._dataloader()
        ds = self.dataset
        jitter = ds.recipe.jitter if self.augment else 0.0
        self._first, self.start_batch = self.start_batch, 0  # read by _batches when the DataLoader starts
        skipped = []
        for b, (images, index, errors) in enumerate(loader, start=self._first):
            gen = torch.Generator().manual_seed(int(epoch_rng(self.seed, self.epoch, 3, self.rank, b).integers(2**62)))
            if errors:
                skipped += errors
            if images is None:
                continue
            x = finish_batch(images.to(self.device, non_blocking=True), ds.mean, ds.std, jitter=jitter, gen=gen,
                             channels_last=self.channels_last)
            yield Batch(images=x, labels=ds.labels.index_select(0, index).to(self.device, non_blocking=True))
        if skipped:
            self.skipped += len(skipped)
            log.warning("%s: left out %d unreadable images this epoch (data.skip_bad_images); first: %s",
                        self.dataset.name, len(skipped), skipped[0])
