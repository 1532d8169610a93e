"""Evaluation of a stage-1 network: accuracy of the mean logits of all experts on the test set,
overall and per many / medium / few split.

`evaluate_model` is the one evaluation pass (the Trainer's after each epoch, too);
`evaluate_checkpoint` is `ride-fast eval` on a stage-1 checkpoint: the network and the test data
only, no optimizer or loss. `write_per_class_report` writes the long-tail picture of a run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ride_fast.data import build_datasets, build_loaders
from ride_fast.engine.checkpoint import atomic_write_text, checkpoint_config, load_checkpoint, network_from_checkpoint
from ride_fast.engine.distributed import DistContext, all_reduce_
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.monitor import progress
from ride_fast.engine.runtime import autocast_context, resolve_device, seed_everything
from ride_fast.engine.step import prefetch_to_device
from ride_fast.io import pyplot, save_figure


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, class_counts, *, device: torch.device, amp: str = "none", prefetch: bool = True,
                   dist: DistContext | None = None, show_progress: bool = False) -> SplitAccuracy:
    """Accuracy of `model`'s mean logits over `loader` (eval mode), overall and per split of
    `class_counts` [C] (the training counts). In a torchrun job (`dist`) each rank evaluates its
    shard and the per-class counts are summed over ranks. `show_progress`: a bar over the batches (on a terminal)."""
    device = torch.device(device)
    num_classes = len(class_counts)
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros_like(correct)
    for batch in progress(prefetch_to_device(loader, device, prefetch), "eval", total=len(loader), enabled=show_progress):
        with autocast_context(device, amp):
            logits = model(batch.images).logits
        c, t = per_class_accuracy(logits.argmax(1), batch.labels, num_classes)
        correct += c
        total += t
    if dist is not None:
        all_reduce_(correct, dist)
        all_reduce_(total, dist)
    return split_accuracy(correct, total, class_counts)


def evaluate_checkpoint(checkpoint: str | Path, overrides: dict | None = None, *, datasets=None) -> SplitAccuracy:
    """`ride-fast eval` on a stage-1 checkpoint. The run's own config (defaults for a converted
    original checkpoint), then `overrides` (e.g. {"data": {"root": ...}, "train": {"device": "cpu"}});
    the architecture comes from the checkpoint. `datasets` = (train, test) replaces building cfg.data."""
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, overrides)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    model = network_from_checkpoint(ckpt, checkpoint, device=device, batched=cfg.model.batched, channels_last=cfg.model.channels_last)
    if train_set.num_classes != model.num_classes:
        raise ValueError(f"{checkpoint}: the network has {model.num_classes} classes but data {cfg.data.name} has "
                         f"{train_set.num_classes}; pass the data it was trained on (data.name=... data.root=...)")
    _, test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)
    return evaluate_model(model, test_loader, train_set.class_counts(), device=device, amp=cfg.train.amp, prefetch=cfg.train.prefetch,
                          show_progress=True)


def write_per_class_report(out_dir: Path, epoch: int, acc: SplitAccuracy, class_counts) -> None:
    """per_class_accuracy.json and .png in `out_dir`: each class's accuracy against its number of
    training images, the long-tail picture of a run."""
    out_dir = Path(out_dir)
    counts = [int(c) for c in class_counts]
    atomic_write_text(json.dumps({"epoch": epoch, "test": acc.as_dict(), "class_counts": counts,
                                  "per_class_accuracy": acc.per_class}, indent=1), out_dir / "per_class_accuracy.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    per_class = np.asarray(acc.per_class, dtype=np.float64)
    ax.scatter(counts, per_class, s=12, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(f"epoch {epoch}: overall {acc.overall:.1f}, many {acc.many:.1f}, medium {acc.medium:.1f}, few {acc.few:.1f}",
                 fontsize=9)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir / "per_class_accuracy.png")
