"""Expert classifiers: the cosine classifier of RIDE and its scaled head.

Shape legend: B images, D feature width, C classes.

    x       [B, D]   pooled expert feature
    weight  [D, C]   NormedLinear weight (note: [in, out], the transpose of nn.Linear's)
    logits  [B, C]

Cosine head: logits = s * normalize(x, dim=1) @ normalize(W, dim=0), no bias, s = 30.
With use_norm=False the head is a plain nn.Linear with bias and s = 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

COSINE_SCALE = 30.0


class NormedLinear(nn.Module):
    """Cosine similarity between features and class vectors: normalize(x) @ normalize(W).

    W [in_features, out_features] starts as U(-1, 1) with every class column rescaled to unit
    L2 norm (the original's `uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.uniform_(-1.0, 1.0)
        self.weight.div_(self.weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CosineHead(NormedLinear):
    """NormedLinear whose output is multiplied by the scale s (30 in every RIDE recipe)."""

    def __init__(self, in_features: int, out_features: int, scale: float = COSINE_SCALE) -> None:
        super().__init__(in_features, out_features)
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


def make_head(in_features: int, num_classes: int, use_norm: bool) -> tuple[nn.Module, float]:
    """Return (head, s): a CosineHead with s = 30 if use_norm, else nn.Linear (bias) with s = 1.

    The head's output is already s-scaled. Weight init of nn.Linear is left to the caller
    (the CIFAR family re-initialises it with kaiming_normal_, the ImageNet family does not).
    """
    if use_norm:
        return CosineHead(in_features, num_classes, COSINE_SCALE), COSINE_SCALE
    return nn.Linear(in_features, num_classes), 1.0
