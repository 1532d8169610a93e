"""Batched experts: the E expert branches of a RIDENet run as one grouped network (docs/method.md §2).

Shape legend: B images, E experts, C classes, D feature width of one expert, Ct trunk output
channels, o / i output / input channels of one expert's convolution, g its groups (1, or 32 for
ResNeXt), k kernel size.

Every expert takes the same trunk output, so E experts are one wide network with block-diagonal
convolutions. Per expert stage of E branches:

    first conv of the first block   Conv2d(Ct -> E*o, groups g)      the experts' convs stacked on
    (and its 1x1 downsample)                                         the output channels (shared input)
    every later conv                Conv2d(E*i -> E*o, groups E*g)   block diagonal
    BatchNorm                       BatchNorm2d(E*o)                 per channel: one BN is exact
    option-A shortcut (CIFAR)       subsample, zero-pad each expert's own channel block
    pooling                         [B, E*D, H, W] -> [B, E*D] -> [E, B, D]
    heads                           cosine: s * bmm(normalize(f [E, B, D]), normalize(W [E, D, C]))
                                    linear: baddbmm(b [E, 1, C], f [E, B, D], W^T [E, D, C])

Expert e owns the channel block [e*o, (e+1)*o) of every batched tensor and the rows
[e*o, (e+1)*o) of every batched conv weight, so converting weights is a concatenation along
dim 0 (convs, BN) or a stack (heads), and back a chunk / unbind: see `to_batched`, `to_per_expert`
and, for the state dicts, ride_fast.models.layout. The layers and blocks are in
ride_fast.models.batched_blocks. This is exact, not an approximation:
logits, features and gradients equal the per-expert network's up to floating-point summation order.

`forward_expert(i, trunk_out)` runs one expert alone with slices of the grouped weights (routed
inference). In training mode it updates the slices of the BatchNorm running statistics, but not
`num_batches_tracked` (only used when BatchNorm momentum is None, never in ride_fast).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.models.batched_blocks import BATCHED_BLOCKS, ExpertSequential
from ride_fast.models.heads import CosineHead, full_precision
from ride_fast.models.layout import batched_state_dict, is_batched_layout, is_per_expert_layout, per_expert_state_dict
from ride_fast.models.output import RIDEOutput
from ride_fast.models.registry import model_entrypoint
from ride_fast.models.ride import ExpertBranch, RIDENet

# --------------------------------------------------------------------------------------------
# experts and heads


class BatchedExperts(nn.Module):
    """All E expert branches at once: trunk_out [B, Ct, H, W] -> features [E, B, D].

    Children are the expert stages under the per-expert names (layer2, layer3 | layer3, layer4),
    each an ExpertSequential of batched blocks, then adaptive average pooling.
    """

    def __init__(self, stages: Mapping[str, ExpertSequential], num_experts: int, feature_dim: int) -> None:
        super().__init__()
        for name, stage in stages.items():
            self.add_module(name, stage)
        self.stage_names: tuple[str, ...] = tuple(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_experts, self.feature_dim = num_experts, feature_dim

    @classmethod
    def like(cls, branch: ExpertBranch, num_experts: int, feature_dim: int) -> BatchedExperts:
        """The batched version of E copies of `branch` (weights not copied)."""
        stages: dict[str, ExpertSequential] = {}
        for s, name in enumerate(branch.stage_names):
            blocks = []
            for b, block in enumerate(getattr(branch, name)):
                if type(block) not in BATCHED_BLOCKS:
                    raise TypeError(f"no batched version of {type(block).__name__} (stage {name}, block {b})")
                blocks.append(BATCHED_BLOCKS[type(block)](block, num_experts, shared_input=(s == 0 and b == 0)))
            stages[name] = ExpertSequential(*blocks)
        return cls(stages, num_experts, feature_dim)

    def forward(self, trunk_out: Tensor) -> Tensor:
        x = trunk_out
        for name in self.stage_names:
            x = getattr(self, name)(x)
        f = self.pool(x).flatten(1)  # [B, E*D]
        return f.view(f.shape[0], self.num_experts, self.feature_dim).transpose(0, 1)  # [E, B, D]

    def forward_expert(self, i: int, trunk_out: Tensor) -> Tensor:
        """Expert i alone: trunk_out [B, Ct, H, W] -> [B, D]."""
        x = trunk_out
        for name in self.stage_names:
            x = getattr(self, name).forward_expert(x, i)
        return self.pool(x).flatten(1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, feature_dim={self.feature_dim}"


class BatchedCosineHead(nn.Module):
    """E cosine classifiers: s * normalize(f [E, B, D], D) @ normalize(W [E, D, C], D) -> [E, B, C].
    In float32 (or float64) even under autocast, as CosineHead."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.scale = float(scale)

    def forward(self, features: Tensor) -> Tensor:
        ctx, dtype = full_precision(features, self.weight)
        with ctx:
            return torch.bmm(F.normalize(features.to(dtype), dim=2), F.normalize(self.weight.to(dtype), dim=1)) * self.scale

    def forward_expert(self, i: int, feature: Tensor) -> Tensor:
        ctx, dtype = full_precision(feature, self.weight)
        with ctx:
            return (F.normalize(feature.to(dtype), dim=1) @ F.normalize(self.weight[i].to(dtype), dim=0)) * self.scale

    def extra_repr(self) -> str:
        E, D, C = self.weight.shape
        return f"num_experts={E}, in_features={D}, out_features={C}, scale={self.scale:g}"


class BatchedLinearHead(nn.Module):
    """E nn.Linear classifiers: weight [E, C, D], bias [E, C]; f [E, B, D] -> [E, B, C]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))

    def forward(self, features: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), features, self.weight.transpose(1, 2))

    def forward_expert(self, i: int, feature: Tensor) -> Tensor:
        return F.linear(feature, self.weight[i], self.bias[i])

    def extra_repr(self) -> str:
        E, C, D = self.weight.shape
        return f"num_experts={E}, in_features={D}, out_features={C}"


def _batched_head_like(head: nn.Module, num_experts: int) -> nn.Module:
    if isinstance(head, CosineHead):
        return BatchedCosineHead(num_experts, head.in_features, head.out_features, head.scale)
    if type(head) is nn.Linear:
        return BatchedLinearHead(num_experts, head.in_features, head.out_features)
    raise TypeError(f"no batched version of the head {type(head).__name__}")


# --------------------------------------------------------------------------------------------
# the network


class BatchedRIDENet(RIDENet):
    """A RIDENet whose experts run as one grouped network; same outputs, parameters and API.

    `experts` is a BatchedExperts (trunk_out -> [E, B, D]) and `heads` a BatchedCosineHead or
    BatchedLinearHead ([E, B, D] -> [E, B, C]). `load_state_dict` also accepts the per-expert
    layout (`experts.{i}.*`, `heads.{i}.*`) and converts it.
    """

    batched = True

    def __init__(self, trunk: nn.Module, experts: BatchedExperts, heads: nn.Module, *, feature_dim: int, num_classes: int,
                 scale: float, model_args: dict[str, Any]) -> None:
        nn.Module.__init__(self)  # RIDENet.__init__ takes lists of per-expert modules
        self.trunk, self.experts, self.heads = trunk, experts, heads
        self.num_experts = experts.num_experts
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.scale = float(scale)
        self._model_args = {**model_args, "batched": True}

    def forward_expert(self, i: int, trunk_out: Tensor) -> tuple[Tensor, Tensor]:
        """Expert i alone (slices of the grouped weights): -> (logits [B, C], feature [B, D])."""
        if not 0 <= i < self.num_experts:
            raise IndexError(f"expert index {i} out of range for {self.num_experts} experts")
        feature = self.experts.forward_expert(i, trunk_out)
        return self.heads.forward_expert(i, feature), feature

    def forward(self, x: Tensor) -> RIDEOutput:
        features = self.experts(self.forward_trunk(x))  # [E, B, D]
        expert_logits = self.heads(features)  # [E, B, C]
        return RIDEOutput(expert_logits.mean(dim=0), expert_logits, features)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if is_per_expert_layout(state_dict):
            state_dict = batched_state_dict(state_dict, self.num_experts)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# --------------------------------------------------------------------------------------------
# conversion


def to_batched(model: RIDENet) -> BatchedRIDENet:
    """A BatchedRIDENet with the weights, buffers, device and dtype of a per-expert `model` (which is
    left unchanged). Training mode is copied too."""
    if isinstance(model, BatchedRIDENet):
        return model
    E = model.num_experts
    batched = BatchedRIDENet(
        copy.deepcopy(model.trunk),
        BatchedExperts.like(model.experts[0], E, model.feature_dim),
        _batched_head_like(model.heads[0], E),
        feature_dim=model.feature_dim,
        num_classes=model.num_classes,
        scale=model.scale,
        model_args=model.model_args,
    )
    ref = next(model.parameters())
    batched.to(device=ref.device, dtype=ref.dtype)
    batched.load_state_dict(batched_state_dict(model.state_dict(), E))
    return batched.train(model.training)


def to_per_expert(model: RIDENet) -> RIDENet:
    """The per-expert RIDENet (create_model layout) with the weights of a BatchedRIDENet."""
    if not isinstance(model, BatchedRIDENet):
        return model
    args = {k: v for k, v in model.model_args.items() if k not in ("name", "batched")}
    ref = next(model.parameters())
    with torch.device("meta"):  # the arguments were checked when `model` was built
        per = model_entrypoint(model.name)(**args)
    per = per.to_empty(device=ref.device).to(dtype=ref.dtype)
    per.load_state_dict(per_expert_state_dict(model.state_dict(), model.num_experts))
    return per.train(model.training)


__all__ = [
    "BatchedCosineHead",
    "BatchedExperts",
    "BatchedLinearHead",
    "BatchedRIDENet",
    "batched_state_dict",  # re-exported from ride_fast.models.layout
    "is_batched_layout",
    "is_per_expert_layout",
    "per_expert_state_dict",
    "to_batched",
    "to_per_expert",
]
