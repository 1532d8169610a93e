"""Per-epoch learning-rate schedule of the RIDE recipes (docs/method.md §8), stepped once per epoch."""
from __future__ import annotations


def lr_multiplier(epoch: int, warmup_epochs: int, milestones: tuple[int, ...], gamma: float) -> float:
    """Multiplier of the base lr for `epoch` (1-based).

    e / warmup while e <= warmup; then 1; times gamma once for every milestone m with e > m
    (CIFAR: warm-up 5, x0.01 after 160 and again after 180).
    """
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    if warmup_epochs > 0 and epoch <= warmup_epochs:
        return epoch / warmup_epochs
    return gamma ** sum(epoch > m for m in milestones)
