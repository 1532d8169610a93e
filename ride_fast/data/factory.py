"""Build the data sets and the loaders of a run from its `DataConfig`.

    train_set, test_set = build_datasets(cfg.data)
    train_loader, test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last, seed)

Data sets: in memory (`ArrayDataset`: mnist_lt, cifar10_lt, cifar100_lt) or read from files
(`ImageListDataset`: imagenet_lt, inat2018, image_list, image_folder). Both offer `num_classes`,
`name`, `labels` [N] and `class_counts()`.

Loaders (`data.loader`): "memory" (InMemoryLoader, the data set on the training device), "dali"
(DALI pipelines), "torch" (PIL + DataLoader workers); "auto" picks memory for in-memory data sets,
and DALI for files when it is installed, else torch. Every loader has `set_epoch(e)`, `__len__`
and yields `Batch(images [B, 3, S, S] float normalised, labels [B] int64)` on the training device.
"""
from __future__ import annotations

import difflib

import torch

from ride_fast.data.dataset import ArrayDataset
from ride_fast.data.image_list import FILE_DATASETS, read_file_datasets
from ride_fast.data.loader import InMemoryLoader
from ride_fast.data.samplers import ClassBalancedSampler, ShuffleSampler
from ride_fast.data.verify import validate

ARRAY_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")
DATASETS = ARRAY_DATASETS + tuple(FILE_DATASETS)
LOADERS = ("auto", "memory", "dali", "torch")


def is_file_dataset(name: str) -> bool:
    return name in FILE_DATASETS


def build_datasets(cfg):
    """(train, test) for a `DataConfig`. File data sets are checked first (list lines, labels, the
    images at `data.verify_images`, empty classes): a problem raises DataError naming the file and
    line, unless `data.skip_bad_images` lets missing or unreadable images be left out."""
    if cfg.name == "mnist_lt":
        from ride_fast.data.mnist_lt import build_mnist_lt

        return build_mnist_lt(cfg.imbalance_factor, cfg.test_per_class, cfg.seed)
    if cfg.name in ("cifar10_lt", "cifar100_lt"):
        from ride_fast.data.cifar import build_cifar_lt

        if not cfg.root:
            raise ValueError(f"data.root must name the folder holding the CIFAR python files for data.name={cfg.name}")
        return build_cifar_lt(cfg.root, 10 if cfg.name == "cifar10_lt" else 100, cfg.imbalance_factor, cfg.seed)
    if is_file_dataset(cfg.name):
        train, test, problems = read_file_datasets(cfg)
        threads = 16 if cfg.num_workers < 0 else max(1, cfg.num_workers)
        return validate(train, test, problems, level=cfg.verify_images, skip_bad_images=cfg.skip_bad_images, threads=threads)
    close = difflib.get_close_matches(cfg.name, DATASETS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"data.name: unknown data set '{cfg.name}'{hint}; known: {', '.join(DATASETS)}")


def choose_loader(cfg, dataset) -> str:
    """The loader kind `data.loader` resolves to for this data set: memory, dali or torch."""
    from ride_fast.data.dali import dali_available

    kind = cfg.loader
    if kind not in LOADERS:
        raise ValueError(f"data.loader: {kind!r} is not one of {list(LOADERS)}")
    in_memory = isinstance(dataset, ArrayDataset)
    if kind == "auto":
        return "memory" if in_memory else ("dali" if dali_available() else "torch")
    if kind == "memory" and not in_memory:
        raise ValueError(f"data.loader=memory: {dataset.name} is read from image files; use auto, dali or torch")
    if kind == "torch" and in_memory:
        return "memory"  # the torch path for arrays is the in-memory loader
    return kind


def build_loaders(cfg, train_set, test_set, device="cpu", channels_last: bool = False, seed: int = 0,
                  rank: int = 0, world_size: int = 1, train_sampler="shuffle"):
    """(train_loader, test_loader) for this rank.

    cfg: DataConfig; batch sizes in it are global (divided by world_size). train_sampler:
    "shuffle" (a permutation per epoch), "balanced" (the stage-2 class-balanced sampler) or a
    sampler object (see ride_fast.data.samplers). Evaluation visits every test image exactly once
    over all ranks (ranks' last batches may be smaller; nothing is padded or duplicated).
    """
    device = torch.device(device)
    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is the global batch: it must be divisible by the {world_size} ranks")
    batch = cfg.batch_size // world_size
    eval_batch = max(1, cfg.eval_batch_size // world_size)
    if train_sampler == "shuffle":
        sampler = ShuffleSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    elif train_sampler == "balanced":
        sampler = ClassBalancedSampler(train_set.labels.numpy(), train_set.num_classes, seed=seed, rank=rank, world_size=world_size)
    elif isinstance(train_sampler, str):
        raise ValueError(f"train_sampler must be 'shuffle', 'balanced' or a sampler, got {train_sampler!r}")
    else:
        sampler = train_sampler
    test_sampler = ShuffleSampler(len(test_set), shuffle=False, rank=rank, world_size=world_size, pad=False)

    kind = choose_loader(cfg, train_set)
    if kind == "memory":
        train = InMemoryLoader(train_set, batch, train=True, device=device, augment=cfg.augment, channels_last=channels_last,
                               seed=seed, sampler=sampler)
        test = InMemoryLoader(test_set, eval_batch, train=False, device=device, channels_last=channels_last, sampler=test_sampler)
        return train, test
    common = dict(device=device, channels_last=channels_last, seed=seed, num_workers=cfg.num_workers)
    if kind == "dali":
        from ride_fast.data.dali import DaliArrayLoader, DaliImageLoader

        if isinstance(train_set, ArrayDataset):
            return (DaliArrayLoader(train_set, batch, train=True, augment=cfg.augment, sampler=sampler, **common),
                    DaliArrayLoader(test_set, eval_batch, train=False, sampler=test_sampler, **common))
        if cfg.decode_device == "gpu" and device.type != "cuda":
            raise ValueError(f"data.decode_device=gpu needs a CUDA training device, got {device}")
        on_gpu = device.type == "cuda" and cfg.decode_device != "cpu"
        return (DaliImageLoader(train_set, batch, train=True, augment=cfg.augment, sampler=sampler, decode_on_gpu=on_gpu, **common),
                DaliImageLoader(test_set, eval_batch, train=False, sampler=test_sampler, decode_on_gpu=on_gpu, **common))
    from ride_fast.data.torch_loader import TorchImageLoader

    skip = cfg.skip_bad_images
    return (TorchImageLoader(train_set, batch, train=True, augment=cfg.augment, sampler=sampler, skip_bad_images=skip, **common),
            TorchImageLoader(test_set, eval_batch, train=False, sampler=test_sampler, skip_bad_images=skip, **common))


__all__ = ["ARRAY_DATASETS", "DATASETS", "LOADERS", "build_datasets", "build_loaders", "choose_loader", "is_file_dataset"]
