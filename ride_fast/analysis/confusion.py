"""Hardest-negative confusion (the paper's Fig. 1b): how strongly each test image is pulled to a wrong class.

Shape legend: N test images, C classes, K histogram bins over [0, 1].

    logits     [N, C]   a model's prediction (RIDE: the mean of the experts' logits, or routed)
    p          [N, C]   softmax(logits)
    score      [N]      max_{c != y} p[n, c]: the hardest negative's probability
    negative   [N]      argmax_{c != y} p[n, c]: the hardest negative class
    target     [N]      p[n, y]

Per split (many / medium / few by training count) and overall: a histogram of `score` over K equal
bins of [0, 1] (counts and fractions of the split's images), its mean and median, and the share of
images whose hardest negative outscores the target (those are misclassified).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ride_fast.analysis.common import (
    SPLIT_NAMES,
    collect_outputs,
    eval_loader,
    load_analysis_checkpoint,
    write_json,
)
from ride_fast.data import split_of_classes
from ride_fast.engine.monitor import info
from ride_fast.io import pyplot, save_figure


@dataclass
class HardNegatives:
    """Per test image: hardest negative score and class, target probability (all [N])."""

    score: Tensor  # [N] float
    negative: Tensor  # [N] int64
    target: Tensor  # [N] float
    labels: Tensor  # [N] int64


def hardest_negatives(logits: Tensor, labels: Tensor) -> HardNegatives:
    """The largest softmax probability among the wrong classes of every image."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    N, C = logits.shape
    if C < 2:
        raise ValueError("hardest negatives need at least 2 classes")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (N,):
        raise ValueError(f"labels must be [{N}], got shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= C:
        raise ValueError(f"labels must lie in 0..{C - 1}")
    p = torch.softmax(logits.float(), dim=1)
    target = p.gather(1, labels[:, None]).squeeze(1)
    score, negative = p.scatter(1, labels[:, None], -1.0).max(1)  # the target can never win
    return HardNegatives(score, negative, target, labels)


@dataclass
class ConfusionReport:
    """Histograms of the hardest-negative score per split for one model."""

    name: str
    bins: np.ndarray  # [K + 1] edges over [0, 1]
    counts: dict[str, np.ndarray]  # split -> [K] images per bin
    stats: dict[str, dict[str, float]]  # split -> images, mean, median, share_negative_wins, mean_target

    def as_dict(self) -> dict:
        return {"bins": self.bins.tolist(),
                "splits": {s: {**self.stats[s], "counts": self.counts[s].tolist(),
                               "fractions": (self.counts[s] / max(self.counts[s].sum(), 1)).tolist()} for s in self.counts}}


def confusion_report(hn: HardNegatives, class_counts, bins: int = 20, name: str = "") -> ConfusionReport:
    """Histogram and statistics of `hn.score` per split of `class_counts` and overall."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    score, labels = hn.score.numpy(), hn.labels.numpy()
    wins = (hn.score > hn.target).numpy()
    target = hn.target.numpy()
    masks = split_of_classes(class_counts)
    counts, stats = {}, {}
    for split in (*SPLIT_NAMES, "overall"):
        sel = np.ones_like(labels, dtype=bool) if split == "overall" else masks[split][labels]
        s = score[sel]
        counts[split] = np.histogram(s, bins=edges)[0]
        stats[split] = {
            "images": int(sel.sum()),
            "mean": float(s.mean()) if s.size else float("nan"),
            "median": float(np.median(s)) if s.size else float("nan"),
            "share_negative_wins": float(wins[sel].mean()) if s.size else float("nan"),
            "mean_target": float(target[sel].mean()) if s.size else float("nan"),
        }
    return ConfusionReport(name, edges, counts, stats)


@torch.no_grad()
def checkpoint_logits(path: str | Path, overrides: dict | None = None, *, routed: bool = False, datasets=None):
    """(logits [N, C], labels [N], class_counts [C], cfg) of a checkpoint on its test set.

    routed=True on a routed checkpoint: the routed prediction (mean of the experts each image used).
    `datasets` = (train, test) replaces building the checkpoint's data."""
    loaded = load_analysis_checkpoint(path, overrides, datasets=datasets, command="analyze confusion")
    loader = eval_loader(loaded.cfg, loaded.test_set, loaded.device)
    if routed:
        from ride_fast.engine.checkpoint import is_routed_checkpoint, router_from_checkpoint
        from ride_fast.router import routed_forward

        if not is_routed_checkpoint(loaded.ckpt):
            raise ValueError(f"{path}: --routed needs a routed checkpoint (`ride-fast route`); this one has no router")
        router = router_from_checkpoint(loaded.ckpt, loaded.model.num_classes).to(loaded.device).eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(routed_forward(loaded.model, router, batch.images, threshold=loaded.cfg.router.threshold).logits.float().cpu())
            labels.append(batch.labels.cpu())
        return torch.cat(logits), torch.cat(labels), loaded.class_counts, loaded.cfg
    out = collect_outputs(loaded.model, loader, amp=loaded.cfg.train.amp)
    return out.logits, out.labels, loaded.class_counts, loaded.cfg


def run_confusion(
    checkpoints,
    out_dir: str | Path,
    *,
    overrides: dict | None = None,
    bins: int | None = None,
    names=None,
    routed: bool = False,
    datasets=None,
    log: Callable[[str], None] = info,
) -> dict[str, ConfusionReport]:
    """Hardest-negative histograms of one or more checkpoints: confusion.json and confusion.png in out_dir.
    Splits come from each checkpoint's training counts; `datasets` = (train, test) replaces building them."""
    checkpoints = [str(c) for c in checkpoints]
    if not checkpoints:
        raise ValueError("pass at least one --checkpoint")
    names = list(names) if names else _names(checkpoints)
    if len(names) != len(checkpoints):
        raise ValueError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    reports, data = {}, {}
    for name, path in zip(names, checkpoints):
        logits, labels, counts, cfg = checkpoint_logits(path, overrides, routed=routed, datasets=datasets)
        data[name] = cfg.data.name
        reports[name] = confusion_report(hardest_negatives(logits, labels), counts,
                                         cfg.analysis.confusion_bins if bins is None else bins, name)
        s = reports[name].stats
        log(f"{name}: mean hardest-negative score  many {s['many']['mean']:.3f}  medium {s['medium']['mean']:.3f}  "
            f"few {s['few']['mean']:.3f}  overall {s['overall']['mean']:.3f}")
    out_dir = Path(out_dir)
    write_json({"routed": routed, "checkpoints": dict(zip(names, checkpoints)), "data": data,
                "models": {n: r.as_dict() for n, r in reports.items()}}, out_dir / "confusion.json")
    plot_confusion(reports, out_dir / "confusion.png")
    log(f"wrote {out_dir / 'confusion.json'} and {out_dir / 'confusion.png'}")
    return reports


def _names(paths: list[str]) -> list[str]:
    """Short distinct labels: the run folder's name (or the file stem when the folders repeat)."""
    names = [Path(p).parent.name or Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def plot_confusion(reports: dict[str, ConfusionReport], path: str | Path) -> Path:
    """One panel per split: fraction of the split's images per hardest-negative score bin, one line per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6), dpi=120, sharey=True)
    for ax, split in zip(axes, SPLIT_NAMES):
        for name, r in reports.items():
            frac = r.counts[split] / max(r.counts[split].sum(), 1)
            ax.stairs(frac, r.bins, label=f"{name} (mean {r.stats[split]['mean']:.2f})", linewidth=1.5)
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{split} classes")
        ax.set_xlabel("largest softmax score among the wrong classes")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the split's test images")
    return save_figure(fig, path)
