"""Evaluation of a stage-1 network: accuracy of the mean logits of all experts on the test set,
overall and per many / medium / few split.

`evaluate_model` is the one evaluation pass (the Trainer's after each epoch, too);
`evaluate_checkpoint` is `ride-fast eval` on a stage-1 checkpoint: the network and the test data
only, no optimizer or loss (`eval_report` reports what it scored through `log`, by default the
`ride_fast` logger like the rest of the engine, and writes it). `write_per_class_report` writes the
long-tail picture of a run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ride_fast.data import build_datasets, build_loaders
from ride_fast.engine.checkpoint import (
    atomic_write_text,
    check_data_classes,
    checkpoint_config,
    inapplicable_options,
    load_checkpoint,
    network_from_checkpoint,
    require_data,
)
from ride_fast.engine.distributed import DistContext, all_reduce_
from ride_fast.engine.metrics import SplitAccuracy, pct, per_class_accuracy, split_accuracy
from ride_fast.engine.monitor import info, progress, warn
from ride_fast.engine.runtime import autocast_context, resolve_device, seed_everything
from ride_fast.engine.step import prefetch_to_device
from ride_fast.io import json_text, plural, pyplot, save_figure


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


# the options `ride-fast eval` reads (a section name covers all its keys); routed checkpoints add router.threshold
EVAL_OPTIONS = {"data", "train.device", "train.amp", "train.seed", "train.deterministic", "train.prefetch", "model.batched",
                "model.channels_last"}


def eval_config(ckpt: dict, checkpoint: str | Path, overrides: dict | None, *, routed: bool, datasets=None,
                log: Callable[[str], None] = info):
    """The config `ride-fast eval` scores a checkpoint with: the run's own, then `overrides`. Refuses a
    checkpoint without a data config unless data options (or `datasets`) are given; warns about
    options that do not apply to the checkpoint (they are ignored)."""
    if datasets is None:
        require_data(ckpt, checkpoint, overrides, "eval")
    ignored = inapplicable_options(overrides, EVAL_OPTIONS | ({"router.threshold"} if routed else set()))
    for key in ignored:
        if key.startswith("router.") and not routed:
            experts = int((ckpt.get("model_args") or {}).get("num_experts", 0))
            why = "it has one expert, nothing to route" if experts == 1 else "it has no router (`ride-fast route` trains one)"
            warn(log, f"{key} does not apply to {checkpoint}: {why}; ignored")
        elif key.startswith("router."):
            warn(log, f"{key} does not apply: the checkpoint's router is used as trained (only router.threshold applies); "
                 "ignored")
        else:
            warn(log, f"{key} does not apply to `ride-fast eval` (the architecture and training options come from the "
                 "checkpoint); ignored")
    return checkpoint_config(ckpt, overrides)


def scored_data(cfg, test_set, checkpoint: str | Path) -> dict:
    """What an evaluation scored, for its printed line and its JSON: checkpoint, data set, split, images."""
    return {"checkpoint": str(checkpoint), "data": {"name": cfg.data.name, "root": cfg.data.root, "split": "test",
                                                    "num_images": len(test_set)}}


def split_counts(ckpt: dict, train_set, checkpoint: str | Path, log: Callable[[str], None] = info) -> np.ndarray:
    """The training images per class [C] that define the many / medium / few splits: the checkpoint's
    own record (the training set the network learned from) when it has one, else the rebuilt training
    set's. Warns when the rebuilt training set has other counts (e.g. another data.imbalance_factor)."""
    built = np.asarray(train_set.class_counts(), dtype=np.int64)
    stored = np.asarray(ckpt.get("class_counts") or [], dtype=np.int64)
    if stored.shape != built.shape:
        return built
    if not np.array_equal(stored, built):
        c = int(np.flatnonzero(stored != built)[0])
        warn(log, f"the training set built from the data options has other class counts than {checkpoint} was trained "
                  f"with (class {c}: {plural(int(built[c]), 'image')}, trained with {int(stored[c]):,}); the many / medium / few "
                  "splits use the checkpoint's counts")
    return stored


def describe_scored(scored: dict) -> str:
    """'CKPT on cifar100_lt (root R), test split, 10,000 images'."""
    d = scored["data"]
    root = f" (root {d['root']})" if d["root"] else ""
    return f"{scored['checkpoint']} on {d['name']}{root}, {d['split']} split, {d['num_images']:,} images"


def evaluate_checkpoint(checkpoint: str | Path, overrides: dict | None = None, *, datasets=None,
                        log: Callable[[str], None] = info) -> SplitAccuracy:
    """`ride-fast eval` on a stage-1 checkpoint. The run's own config (a checkpoint without a data
    config needs data options), then `overrides` (e.g. {"data": {"root": ...}, "train": {"device": "cpu"}});
    the architecture comes from the checkpoint. `datasets` = (train, test) replaces building cfg.data."""
    return _evaluate_checkpoint(checkpoint, overrides, datasets=datasets, log=log)[0]


def _evaluate_checkpoint(checkpoint, overrides, *, datasets, log) -> tuple[SplitAccuracy, dict]:
    ckpt = load_checkpoint(checkpoint)
    cfg = eval_config(ckpt, checkpoint, overrides, routed=False, datasets=datasets, log=log)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    model = network_from_checkpoint(ckpt, checkpoint, device=device, batched=cfg.model.batched, channels_last=cfg.model.channels_last)
    check_data_classes(checkpoint, model.num_classes, cfg.data.name, train_set.num_classes)
    _, test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)
    counts = split_counts(ckpt, train_set, checkpoint, log)
    acc = evaluate_model(model, test_loader, counts, device=device, amp=cfg.train.amp, prefetch=cfg.train.prefetch, show_progress=True)
    return acc, scored_data(cfg, test_set, checkpoint)


def eval_report(checkpoint: str | Path, overrides: dict | None = None, json_path: str | Path | None = None, *, datasets=None,
                log: Callable[[str], None] = info) -> dict:
    """`ride-fast eval` on a stage-1 checkpoint: reports what it scored (checkpoint, data set, split,
    images) and the accuracies through `log` (warnings as WARNING records when `log` is the logger's
    `info`); `json_path` also gets them (with per-class accuracy). Returns the dict."""
    acc, scored = _evaluate_checkpoint(checkpoint, overrides, datasets=datasets, log=log)
    log(f"{describe_scored(scored)}: overall {acc.overall:.2f}  many {pct(acc.many)}  medium {pct(acc.medium)}  few {pct(acc.few)}")
    result = {**scored, **acc.as_dict(with_per_class=True)}
    if json_path:
        atomic_write_text(json_text(result, indent=2), json_path)
        log(f"wrote {json_path}")
    return result


def write_per_class_report(out_dir: Path, epoch: int, acc: SplitAccuracy, class_counts, *, source: str = "",
                           name: str = "per_class_accuracy") -> None:
    """<name>.json and .png in `out_dir`: each class's accuracy against its number of training images,
    the long-tail picture of a run at `epoch` (`source`: the checkpoint holding that epoch, e.g. best.pt)."""
    out_dir = Path(out_dir)
    counts = [int(c) for c in class_counts]
    atomic_write_text(json_text({"epoch": epoch, "checkpoint": source, "test": acc.as_dict(), "class_counts": counts,
                                  "per_class_accuracy": acc.per_class}, indent=1), out_dir / f"{name}.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    per_class = np.asarray(acc.per_class, dtype=np.float64)
    ax.scatter(counts, per_class, s=12, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(f"epoch {epoch}{f' ({source})' if source else ''}: overall {acc.overall:.1f}, many {pct(acc.many, '.1f')}, "
                 f"medium {pct(acc.medium, '.1f')}, few {pct(acc.few, '.1f')}", fontsize=9)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir / f"{name}.png")
