"""Classifiers on frozen features: re-training (cRT, cosine) and tau-normalisation, the parts of
the two-stage recipes of ride_fast.analysis.two_stage.

Shape legend: E experts, N images, C classes, D pooled feature width of one expert, T tau grid points.

    features   [E, N, D]   every expert's pooled feature, computed once by the frozen network in
                           eval mode (BatchNorm statistics frozen, no augmentation)
    labels     [N]
    head k     [N, D] -> [N, C]   expert k's classifier; the prediction is the mean over experts
    tau_curve  [T] pairs (tau, validation mean per-class accuracy)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ride_fast.analysis.common import collect_outputs
from ride_fast.data import ClassBalancedSampler
from ride_fast.models import CosineHead, RIDENet
from ride_fast.models.heads import COSINE_SCALE


@dataclass
class FeatureSet:
    """Frozen features of a data set (on the CPU)."""

    features: Tensor  # [E, N, D] float32
    labels: Tensor  # [N] int64


def extract_features(model: RIDENet, loader, amp: str = "none") -> FeatureSet:
    """Every expert's pooled feature for every image of `loader`, network in eval mode."""
    out = collect_outputs(model, loader, features=True, amp=amp)
    return FeatureSet(out.features, out.labels)


def is_cosine_head(head: nn.Module) -> bool:
    """A classifier that normalises its class vectors in the forward (NormedLinear / CosineHead)."""
    return hasattr(head, "weight") and not isinstance(head, nn.Linear)


def new_heads(model: RIDENet, cosine: bool) -> list[nn.Module]:
    """Fresh classifiers, one per expert: CosineHead(D, C, s=30) or nn.Linear(D, C) (PyTorch init)."""
    D, C = model.feature_dim, model.num_classes
    return [CosineHead(D, C, COSINE_SCALE) if cosine else nn.Linear(D, C) for _ in range(model.num_experts)]


def heads_logits(heads, features: Tensor) -> Tensor:
    """[E, N, C] logits of every expert's head on its own features [E, N, D]."""
    if len(heads) != features.shape[0]:
        raise ValueError(f"{len(heads)} heads for features of {features.shape[0]} experts")
    return torch.stack([h(f) for h, f in zip(heads, features)])


def cosine_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Cosine annealing to 0 stepped per epoch (epochs from 1)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def train_heads(
    heads: list[nn.Module],
    data: FeatureSet,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    sampler: str = "balanced",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train `heads` in place on frozen features: sum over experts of cross-entropy; returns per-epoch
    {epoch, lr, loss, train_acc}. sampler: "balanced" (class-balanced draws, N per epoch) or "shuffle"."""
    if epochs < 1:
        raise ValueError(f"analysis.two_stage_epochs must be >= 1, got {epochs}")
    if sampler not in ("balanced", "shuffle"):
        raise ValueError(f"analysis.two_stage_sampler must be 'balanced' or 'shuffle', got {sampler!r}")
    features, labels = data.features, data.labels  # the heads train where the features are
    N = labels.shape[0]
    for h in heads:
        h.to(features.device)
    C = heads[0].weight.shape[0] if isinstance(heads[0], nn.Linear) else heads[0].weight.shape[1]
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    balanced = ClassBalancedSampler(labels.cpu().numpy(), C, seed=seed) if sampler == "balanced" else None
    gen = torch.Generator().manual_seed(seed)
    history = []
    for h in heads:
        h.train()
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(epoch, lr, epochs)
        if balanced is not None:
            balanced.set_epoch(epoch)
            order = torch.from_numpy(balanced.indices())
        else:
            order = torch.randperm(N, generator=gen)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(features.device)
            y = labels[idx]
            logits = heads_logits(heads, features[:, idx])  # [E, b, C]
            loss = sum(F.cross_entropy(z, y) for z in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)  # host read per step: a head-only step is tiny
            correct += int((logits.detach().mean(0).argmax(1) == y).sum())
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": loss_sum / len(order), "train_acc": 100.0 * correct / len(order)}
        history.append(record)
        if log:
            log(f"  epoch {epoch:3d}  lr {record['lr']:.4f}  loss {record['loss']:.4f}  train acc (sampled) {record['train_acc']:.1f}")
    for h in heads:
        h.eval()
    return history  # heads stay on the features' device


@torch.no_grad()
def tau_normalize(head: nn.Module, tau: float) -> nn.Linear:
    """A new Linear head with weight rows w_c / ||w_c||^tau and no bias (tau = 0: the weights as
    they are, bias dropped). Cosine heads cannot be tau-normalised (see ride_fast.analysis.two_stage)."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"tau-normalisation needs a Linear head; {type(head).__name__} normalises its class vectors itself (a no-op)")
    w = head.weight  # [C, D]
    out = nn.Linear(head.in_features, head.out_features, bias=False).to(w.device)
    out.weight.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau))
    return out.eval()


def balanced_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean per-class accuracy (percent) over the classes present in `labels`."""
    pred = logits.argmax(1)
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    return float(100.0 * (correct[present] / total[present]).mean())


@torch.no_grad()
def tau_curve(heads, val: FeatureSet, grid) -> list[tuple[float, float]]:
    """(tau, validation mean per-class accuracy) for every tau of `grid`."""
    C = heads[0].out_features
    return [(float(t), balanced_accuracy(heads_logits([tau_normalize(h, t) for h in heads], val.features).mean(0), val.labels, C))
            for t in grid]


def choose_tau(curve: list[tuple[float, float]]) -> float:
    """The tau of the best validation accuracy (the smallest such tau on ties, up to float rounding:
    per-class means of different counts can differ in the last bit)."""
    best = max(acc for _, acc in curve)
    return min(t for t, acc in curve if acc >= best - 1e-9)


__all__ = [
    "FeatureSet",
    "balanced_accuracy",
    "choose_tau",
    "cosine_lr",
    "extract_features",
    "heads_logits",
    "is_cosine_head",
    "new_heads",
    "tau_curve",
    "tau_normalize",
    "train_heads",
]
