"""Baselines for the RIDE loss benchmarks: the loss computed the way the original RIDE code does.

Shape legend: E experts, B images, C classes.

`original_ride_loss_forward` transcribes the per-expert loop of the official `RIDELoss.forward`
(frank-xwang/RIDE-LongTailRecognition, model/loss.py): for every expert a separate LDAM margin
subtraction (one-hot mask, batch margin by a [1, C] @ [C, B] matmul, torch.where),
F.cross_entropy with the class weights, a tempered log_softmax, the softmax of the mean logits
recomputed under no_grad, F.kl_div(batchmean), and a Python sum. Two fixes only: a bool mask instead
of the original uint8 one (torch.where rejects uint8 now), and no `.item()` for the temperature mean
(passed in as a number, as ride_fast does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def original_ride_loss_forward(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
) -> Tensor:
    """The original code's RIDELoss.forward on prepared margins / weights / temperatures: a loop
    over experts, "mean" diversity; float32 scalar. The speed baseline of the benchmarks."""
    output_logits = expert_logits.mean(0)  # the model's mean logits
    T = temperature.view(1, -1) if temperature is not None else 1.0
    loss = 0
    for logits_item in expert_logits:
        if margins is None:
            loss = loss + F.cross_entropy(logits_item, target, weight=class_weights)
        else:
            index = torch.zeros_like(logits_item, dtype=torch.bool)
            index.scatter_(1, target.view(-1, 1), True)
            batch_m = torch.matmul(margins[None, :], index.float().transpose(0, 1)).view(-1, 1)
            final_output = torch.where(index, logits_item - batch_m, logits_item)
            loss = loss + F.cross_entropy(final_output, target, weight=class_weights)
        output_dist = F.log_softmax(logits_item / T, dim=1)
        with torch.no_grad():
            mean_output_dist = F.softmax(output_logits / T, dim=1)
        loss = loss + diversity_factor * temperature_mean * temperature_mean * F.kl_div(
            output_dist, mean_output_dist, reduction="batchmean"
        )
    return loss
