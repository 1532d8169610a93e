"""Router targets and loss (docs/method.md §5), computed from one all-experts pass of the frozen net.

Shape legend: E experts, R = E - 1 routers, B images, C classes, D pooled feature width.

    expert_logits  [E, B, C]  s-scaled logits of every expert
    features       [E, B, D]  pooled features of every expert
    targets        [B]        class labels
    prefix means   [E, B, C]  entry i = (z_1 + ... + z_{i+1}) / (i + 1)
    labels         [R, B]     bool: router i should call expert i + 2 (0-based i)
    router logits  [R, B]

Label of router i (experts 1..i used so far, 1-based): the prefix ensemble 1..i is wrong AND some
longer prefix 1..j (j > i) is right; "right" means argmax of the prefix logits == target.
Loss: binary cross-entropy with logits, positive weight w_on, mean over the batch, averaged over
the routers (one mean over R x B elements, the same thing since every router sees the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ride_fast.router.module import Router


def prefix_mean_logits(expert_logits: Tensor) -> Tensor:
    """[E, B, C] -> running means [E, B, C] (entry i: mean of experts 0..i), in float32."""
    csum = expert_logits.float().cumsum(0)
    n = torch.arange(1, csum.shape[0] + 1, device=csum.device, dtype=csum.dtype)
    return csum / n.view(-1, 1, 1)


def prefix_correct(expert_logits: Tensor, targets: Tensor) -> Tensor:
    """[E, B] bool: whether the ensemble of experts 0..i predicts the target (argmax of the prefix
    sum, which is the argmax of the prefix mean; the original uses the sum)."""
    return expert_logits.float().cumsum(0).argmax(-1) == targets.unsqueeze(0)


def router_labels(expert_logits: Tensor, targets: Tensor) -> Tensor:
    """[R, B] bool targets of the routers: prefix 1..i wrong and some prefix 1..j, j > i, right."""
    if expert_logits.dim() != 3 or expert_logits.shape[0] < 2:
        raise ValueError(f"router labels need expert_logits [E >= 2, B, C], got {tuple(expert_logits.shape)}")
    if targets.shape != expert_logits.shape[1:2]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match expert_logits {tuple(expert_logits.shape)} (expected [B])")
    right = prefix_correct(expert_logits, targets)  # [E, B]
    right_later = right.flip(0).cumsum(0).flip(0) > 0  # [E, B]: any(right[j:]) for row j
    return ~right[:-1] & right_later[1:]


def router_loss(router_logits: Tensor, labels: Tensor, w_on: float) -> Tensor:
    """Weighted BCE with logits (positive weight w_on), mean over batch and routers: a scalar."""
    if router_logits.shape != labels.shape:
        raise ValueError(f"router logits {tuple(router_logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    logits = router_logits.float()
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=logits.new_full((), w_on))  # a fill, not a host copy


@dataclass(frozen=True)
class RouterStep:
    """What one stage-2 step computes (tensors stay on the device)."""

    loss: Tensor  # [] weighted BCE
    router_logits: Tensor  # [R, B]
    labels: Tensor  # [R, B] bool


def router_step(router: Router, expert_logits: Tensor, features: Tensor, targets: Tensor, w_on: float) -> RouterStep:
    """Labels from the frozen experts' logits, every router on every image, and the loss.

    expert_logits [E, B, C] and features [E, B, D] come from one forward of the frozen network
    (all experts on all images); only the router gets gradients.
    """
    if features.shape[:2] != expert_logits.shape[:2]:
        raise ValueError(f"features {tuple(features.shape)} and expert_logits {tuple(expert_logits.shape)} disagree on [E, B]")
    if expert_logits.shape[0] != router.num_experts:
        raise ValueError(f"the network has {expert_logits.shape[0]} experts but the router was built for {router.num_experts}")
    labels = router_labels(expert_logits, targets)
    means = prefix_mean_logits(expert_logits)[:-1]  # [R, B, C]: after experts 1..R
    logits = router.forward_all(features[:-1].float(), means)
    return RouterStep(router_loss(logits, labels, w_on), logits, labels)
