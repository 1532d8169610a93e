"""Batched augmentation on tensors, on whatever device the batch is on (no per-image Python loop).

Shape legend: B images, K channels, H x W pixels; x is [B, K, H, W] float in [0, 1].
Random parameters are drawn from a CPU torch.Generator (reproducible, resumable) and moved to the
batch's device; the pixel work happens there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by `padding` on every side, then crop back to H x W at a random offset per image."""
    B, K, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, B), generator=gen).to(x.device, non_blocking=True)
    rows = (off[0][:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (off[1][:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    k = torch.arange(K, device=x.device)[None, :, None, None]
    return padded[b, k, rows, cols]


def random_hflip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each image by a uniform angle in [-degrees, degrees] (nearest, zero fill)."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
