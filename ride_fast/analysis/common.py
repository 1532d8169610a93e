"""What every analysis needs: a checkpoint with its data, logits over a data set, split summaries, plots.

Shape legend: N images, E experts, C classes, D pooled feature width of one expert.

    load_analysis_checkpoint(path, overrides) -> Loaded(model, ckpt, cfg, train_set, test_set, class_counts)
    collect_outputs(model, loader) -> Outputs(expert_logits [E, N, C], features [E, N, D] or None, labels [N])
    split_summary(preds [N], labels [N], class_counts [C]) -> SplitAccuracy (percent)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ride_fast.config import Config
from ride_fast.data import ArrayDataset, InMemoryLoader, build_datasets, build_loaders
from ride_fast.engine import (
    SplitAccuracy,
    load_checkpoint,
    per_class_accuracy,
    resolve_device,
    split_accuracy,
)
from ride_fast.engine.checkpoint import check_data_classes, checkpoint_config, network_from_checkpoint, require_data
from ride_fast.engine.evaluate import split_counts
from ride_fast.engine.monitor import progress
from ride_fast.engine.runtime import autocast_context
from ride_fast.io import atomic_write_text, json_text
from ride_fast.models import RIDENet

SPLIT_NAMES = ("many", "medium", "few")


@dataclass
class Outputs:
    """A network's outputs over a whole data set, on the CPU, in data-set order."""

    expert_logits: Tensor  # [E, N, C] float32, s-scaled
    labels: Tensor  # [N] int64
    features: Tensor | None = None  # [E, N, D] float32 (when asked for)

    @property
    def logits(self) -> Tensor:
        """[N, C]: the mean of all experts' logits (RIDE's prediction)."""
        return self.expert_logits.mean(0)


@dataclass
class Loaded:
    """A checkpoint's network (eval mode), its resolved config and the data it was trained on."""

    model: RIDENet
    ckpt: dict
    cfg: Config
    train_set: object
    test_set: object
    class_counts: np.ndarray  # [C] training images per class (the checkpoint's own record): defines the splits
    device: torch.device

    @property
    def train_matches(self) -> bool:
        """Whether the rebuilt training set has the class counts the checkpoint was trained with."""
        return bool(np.array_equal(np.asarray(self.train_set.class_counts()), self.class_counts))


def load_analysis_checkpoint(path: str | Path, overrides: dict | None = None, *, datasets=None,
                             command: str = "analyze") -> Loaded:
    """Rebuild a checkpoint's network and its data (`datasets`=(train, test) skips building them). A
    checkpoint without a data config needs data options in `overrides` (`command` names the refused command)."""
    ckpt = load_checkpoint(path)
    model = network_from_checkpoint(ckpt, path)  # a clear error without model_args, before the config is read
    if datasets is None:
        require_data(ckpt, path, overrides, command)
    cfg = checkpoint_config(ckpt, overrides)
    device = resolve_device(cfg.train.device)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    check_data_classes(path, model.num_classes, cfg.data.name, train_set.num_classes)
    counts = split_counts(ckpt, train_set, path, log=lambda _: None)  # a mismatch: the caller decides (`train_matches`)
    return Loaded(model, ckpt, cfg, train_set, test_set, counts, device)


def input_size(cfg: Config, dataset) -> int:
    """Side of the images the network sees: an in-memory data set's own, else data.image_size (the crop)."""
    if isinstance(dataset, ArrayDataset):
        return int(dataset.images.shape[-1])
    return int(cfg.data.image_size)


def eval_loader(cfg: Config, dataset, device: torch.device, *, batch_size: int | None = None):
    """An evaluation loader over `dataset` (data-set order, every image once, no augmentation)."""
    batch_size = batch_size or cfg.data.eval_batch_size
    if isinstance(dataset, ArrayDataset):
        return InMemoryLoader(dataset, batch_size, train=False, device=device, channels_last=cfg.model.channels_last)
    import dataclasses

    data_cfg = dataclasses.replace(cfg.data, eval_batch_size=batch_size)
    return build_loaders(data_cfg, dataset, dataset, device, channels_last=cfg.model.channels_last)[1]


@torch.no_grad()
def collect_outputs(model: nn.Module, loader, *, features: bool = False, amp: str = "none") -> Outputs:
    """Run `model` (eval mode) over `loader`; per-expert logits (and pooled features) on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    logits, feats, labels = [], [], []
    for batch in progress(loader, "analyze: network outputs"):
        with autocast_context(device, amp):
            out = model(batch.images)
        logits.append(out.expert_logits.float().cpu())
        if features:
            feats.append(out.features.float().cpu())
        labels.append(batch.labels.cpu())
    if not labels:
        raise ValueError("the loader yielded no images")
    return Outputs(torch.cat(logits, 1), torch.cat(labels), torch.cat(feats, 1) if features else None)


def split_summary(preds: Tensor, labels: Tensor, class_counts, num_classes: int | None = None) -> SplitAccuracy:
    """Accuracy in percent: overall over images, many / medium / few as mean per-class accuracy."""
    num_classes = num_classes or len(class_counts)
    correct, total = per_class_accuracy(torch.as_tensor(preds), torch.as_tensor(labels), num_classes)
    return split_accuracy(correct, total, class_counts)


def write_json(data: dict, path: str | Path) -> Path:
    """Write `data` as indented JSON, atomically (NaN written as null)."""
    return atomic_write_text(json_text(data, indent=2), path)




