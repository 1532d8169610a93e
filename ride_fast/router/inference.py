"""Routed inference: experts in order, each on the images that still ask for it (docs/method.md §5).

Shape legend: B images in the batch, A_i images still active at step i (A_0 = B), E experts,
C classes, D pooled feature width, Ct x H x W trunk output.

    trunk_out   [B, Ct, H, W]   computed once
    active      [A_i]           indices (into the batch) of the images that run expert i
    h_act       [A_i, Ct, H, W] their trunk outputs, gathered into a dense batch (index_select)
    sum_act     [A_i, C]        their running sum of logits (experts 0..i)
    logit_sum   [B, C]          float32, each expert's logits added back with index_add
    num_used    [B]             int64, experts used per image (1..E)

Step i (after expert i, 0-based, i < E - 1): router i on the A_i active images (their feature of
expert i and running mean sum_act / (i + 1)); keep those with sigmoid(r) > threshold; the only host
sync of the step is `nonzero`, which must know how many images continue to size the next batch.
Expert i + 1 then runs on those images alone. No per-image Python loop anywhere.

The prediction is the mean of the logits of the experts used; an image that used n experts also
evaluated min(n, E - 1) routers (the cost model of docs/method.md §6).

cuDNN's autotuner (`torch.backends.cudnn.benchmark`, on during training) is off inside: A_i changes
from batch to batch, and each new size would be tuned anew, in the middle of an evaluation or of a
timed image.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ride_fast.models.ride import RIDENet
from ride_fast.router.module import Router


@dataclass(frozen=True)
class RoutedOutput:
    """What routed inference returns."""

    logits: Tensor  # [B, C] float32: mean over the experts each image used
    num_experts: Tensor  # [B] int64 in 1..E: experts used by each image
    total_experts: int  # E, the experts the network has

    def routers_evaluated(self) -> Tensor:
        """[B] int64: routers each image went through, min(n, E - 1)."""
        return self.num_experts.clamp(max=self.total_experts - 1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x.index_select(0, index) that keeps a channels-last layout channels-last.

    A plain index_select on a channels-last 4-D tensor returns a contiguous one through a slow
    strided path. Seen as [B, H, W, C] the tensor is contiguous: its rows are copied whole (the
    fast path on a CPU and a GPU alike), and the result, seen back as [B, C, H, W], is channels-last.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


@torch.no_grad()
def routed_forward(
    model: RIDENet,
    router: Router | None,
    images: Tensor,
    *,
    threshold: float = 0.5,
    decisions: Tensor | None = None,
) -> RoutedOutput:
    """Run `model` (in eval mode) on `images` [B, 3, h, w] with routing; returns RoutedOutput.

    threshold: an image continues after expert i when sigmoid(r_i) > threshold (0.5 in RIDE;
        lower = more experts per image, usually closer to all-experts accuracy; higher = cheaper).
    decisions: optional bool [E - 1, B] that replaces the router (which is then not evaluated):
        row i says which images would continue after expert i (only images still active do).
        All True gives the all-experts prediction, all False expert 1 alone; tests and benchmarks
        use it to force a usage mix.
    """
    E = model.num_experts
    B = images.shape[0]
    if decisions is None:
        if router is None:
            raise ValueError("routed_forward needs a router or a decisions tensor [E - 1, B]")
        if router.num_experts != E:
            raise ValueError(f"the router was built for {router.num_experts} experts but the model has {E}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"router threshold must lie in [0, 1] (a probability), got {threshold}")
    elif decisions.shape != (E - 1, B) or decisions.dtype != torch.bool:
        raise ValueError(f"decisions must be a bool tensor [E - 1 = {E - 1}, B = {B}], got {decisions.dtype} {tuple(decisions.shape)}")

    with _cudnn_autotuner_off():
        return _routed(model, router, images, threshold, decisions)


@contextlib.contextmanager
def _cudnn_autotuner_off() -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _routed(model: RIDENet, router: Router | None, images: Tensor, threshold: float, decisions: Tensor | None) -> RoutedOutput:
    """routed_forward's body, its arguments checked."""
    E = model.num_experts
    B = images.shape[0]
    trunk_out = model.forward_trunk(images)
    z, feature = model.forward_expert(0, trunk_out)
    logit_sum = z.to(torch.float32, copy=True)  # [B, C], owned: index_add_ writes into it
    num_used = torch.ones(B, dtype=torch.long, device=images.device)
    active = torch.arange(B, device=images.device)
    h_act, sum_act = trunk_out, z.float()  # sum_act is only ever replaced, never written in place
    for i in range(E - 1):
        if decisions is None:
            r = router(i, feature, sum_act / (i + 1))
            keep = torch.sigmoid(r.float()) > threshold
        else:
            keep = decisions[i].index_select(0, active)
        idx = keep.nonzero().squeeze(1)  # the step's one host sync: the next batch's size
        if idx.numel() == 0:
            break
        active = active.index_select(0, idx)
        h_act = gather_rows(h_act, idx)
        z, feature = model.forward_expert(i + 1, h_act)
        z = z.float()
        sum_act = sum_act.index_select(0, idx).add_(z)
        logit_sum.index_add_(0, active, z)
        num_used.index_add_(0, active, torch.ones_like(active))
    return RoutedOutput(logit_sum / num_used.unsqueeze(1).to(logit_sum.dtype), num_used, E)


class RoutedRIDE(nn.Module):
    """A RIDE network and its router as one module: `forward(images) -> RoutedOutput`.

    `net` keeps its own forward for all-experts inference; `threshold` is the routing knob.
    """

    def __init__(self, net: RIDENet, router: Router, threshold: float = 0.5) -> None:
        super().__init__()
        if router.num_experts != net.num_experts or router.feature_dim != net.feature_dim or router.num_classes != net.num_classes:
            raise ValueError(
                f"router (E={router.num_experts}, D={router.feature_dim}, C={router.num_classes}) does not fit the network "
                f"(E={net.num_experts}, D={net.feature_dim}, C={net.num_classes})"
            )
        self.net = net
        self.router = router
        self.threshold = float(threshold)

    def forward(self, images: Tensor, threshold: float | None = None) -> RoutedOutput:
        return routed_forward(self.net, self.router, images, threshold=self.threshold if threshold is None else threshold)
