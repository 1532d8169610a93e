"""Multiply-accumulates (MACs) per image, counted with fvcore part by part.

fvcore counts one multiply-accumulate as one "flop"; we report MACs (FLOPs = 2 x MACs). A RIDE
network is counted as trunk + each expert (branch + classifier) separately, because one trace of a
data-dependent (routed) model only sees the branch it took. Batch 1, as in the paper's tables.

BatchNorm is charged BN_OPS_PER_ELEMENT = 4 operations per element whatever the mode, the rule of
the fvcore release the paper's table was made with (fvcore 0.1.5 charges 2 in eval mode and 5 in
training mode). With it the counts match the paper's table (docs/method.md §2; the rule: §6).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn


BN_OPS_PER_ELEMENT = 4


def _batchnorm_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    numel = 1
    for d in get_shape(inputs[0]):
        numel *= d
    return BN_OPS_PER_ELEMENT * numel


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one call of `module(*inputs)` as fvcore counts them (convs, matmuls, norms, pools)."""
    from fvcore.nn import FlopCountAnalysis  # optional dependency, imported on use

    analysis = FlopCountAnalysis(module, inputs).set_op_handle("aten::batch_norm", _batchnorm_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    return int(analysis.total())


class _Trunk(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_trunk(x)


class _Expert(nn.Module):
    def __init__(self, model, index):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, h):
        logits, _ = self.model.forward_expert(self.index, h)
        return logits


@dataclass(frozen=True)
class ModelCost:
    """MACs and parameters per image of a RIDE network, by part."""

    trunk_macs: int
    expert_macs: tuple[int, ...]  # branch + classifier of each expert
    trunk_params: int
    expert_params: tuple[int, ...]

    def macs_with(self, k: int) -> int:
        """Cost of an image that runs the trunk and the first k experts."""
        return self.trunk_macs + sum(self.expert_macs[:k])

    @property
    def total_macs(self) -> int:
        return self.macs_with(len(self.expert_macs))

    def as_dict(self) -> dict:
        return {
            "trunk_macs": self.trunk_macs,
            "expert_macs": list(self.expert_macs),
            "macs_with_k_experts": [self.macs_with(k) for k in range(1, len(self.expert_macs) + 1)],
            "trunk_params": self.trunk_params,
            "expert_params": list(self.expert_params),
        }


@torch.no_grad()
def model_cost(model: nn.Module, image_size: int, in_channels: int = 3) -> ModelCost:
    """Count a RIDENet part by part on one image of `image_size` pixels (in eval mode, on the CPU).
    A BatchedRIDENet is counted as its per-expert twin (the same weights and MACs per expert)."""
    if getattr(model, "batched", False):
        from ride_fast.models import to_per_expert

        model = to_per_expert(model)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        x = torch.zeros(1, in_channels, image_size, image_size, device=device)
        trunk = _Trunk(model)
        h = trunk(x)
        trunk_macs = count_macs(trunk, x)
        expert_macs = tuple(count_macs(_Expert(model, i), h) for i in range(model.num_experts))
    finally:
        model.train(was_training)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expert_params = tuple(n(model.experts[i]) + n(model.heads[i]) for i in range(model.num_experts))
    return ModelCost(trunk_macs, expert_macs, n(model.trunk), expert_params)
