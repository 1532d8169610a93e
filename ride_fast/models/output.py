"""The typed output of a RIDE network.

Shape legend: E experts, B images, C classes, D pooled feature width of one expert.

    logits         [B, C]     mean of the experts' s-scaled logits (the ensemble prediction)
    expert_logits  [E, B, C]  s-scaled logits of every expert (what the RIDE loss takes)
    features       [E, B, D]  every expert's globally pooled feature, before its classifier
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class RIDEOutput(NamedTuple):
    """What `RIDENet.forward` returns (a NamedTuple, so jit tracing and torch.compile take it)."""

    logits: Tensor
    expert_logits: Tensor
    features: Tensor
