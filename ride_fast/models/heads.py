"""Expert classifiers: the cosine classifier of RIDE and its scaled head.

Shape legend: B images, D feature width, C classes.

    x       [B, D]   pooled expert feature
    weight  [D, C]   NormedLinear weight (note: [in, out], the transpose of nn.Linear's)
    logits  [B, C]

Cosine head: logits = s * normalize(x, dim=1) @ normalize(W, dim=0), no bias, s = 30.
With use_norm=False the head is a plain nn.Linear with bias and s = 1.

The cosine head computes in float32 (or float64) even under bf16/fp16 autocast: unit vectors
rounded to bf16 would put about 0.1 of noise on every s-scaled logit, and the head costs nothing.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

COSINE_SCALE = 30.0


def full_precision(x: Tensor, *others: Tensor) -> tuple[contextlib.AbstractContextManager, torch.dtype]:
    """(a context with autocast off on x's device, float32 or wider): how cosine heads compute."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    device_type = x.device.type
    if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False), dtype
    return contextlib.nullcontext(), dtype


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
        ctx, dtype = full_precision(x, self.weight)
        with ctx:
            return F.normalize(x.to(dtype), dim=1) @ F.normalize(self.weight.to(dtype), dim=0)

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
