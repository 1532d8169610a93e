"""The RIDE network: one shared trunk, E expert branches, E classifier heads.

Shape legend: B images, E experts, C classes, D pooled feature width of one expert,
H x W trunk output resolution, Ct trunk output channels.

    x           [B, 3, h, w]     images (contiguous or channels_last)
    trunk_out   [B, Ct, H, W]    forward_trunk(x), shared by every expert
    feature_i   [B, D]           experts[i](trunk_out): expert i's stages + global average pool
    logits_i    [B, C]           heads[i](feature_i), already multiplied by the scale s
    RIDEOutput  logits [B, C] (mean over experts), expert_logits [E, B, C], features [E, B, D]

The three parts stay separate on purpose: routed inference (stage 2) calls forward_trunk once
and then forward_expert(i, ...) on shrinking subsets of images. `BatchedRIDENet`
(ride_fast.models.batched, `create_model(..., batched=True)`) replaces the expert loop with
grouped convolutions without touching the trunk; both load either state-dict layout.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ride_fast.models.layout import is_batched_layout, per_expert_state_dict
from ride_fast.models.output import RIDEOutput


class RIDENet(nn.Module):
    """Shared trunk + E expert branches, each with its own s-scaled classifier.

    Attributes: `num_experts` (E), `num_classes` (C), `feature_dim` (D), `scale` (s: 30 with
    cosine heads, 1 with Linear heads), `trunk`, `experts` (ModuleList: trunk_out -> [B, D]),
    `heads` (ModuleList: [B, D] -> s-scaled [B, C]), `model_args` (rebuilds with create_model).
    """

    batched = False  # BatchedRIDENet (ride_fast.models.batched) sets True

    def __init__(
        self,
        trunk: nn.Module,
        experts: list[nn.Module],
        heads: list[nn.Module],
        *,
        feature_dim: int,
        num_classes: int,
        scale: float,
        model_args: dict[str, Any],
    ) -> None:
        super().__init__()
        if len(experts) != len(heads) or not experts:
            raise ValueError(f"need as many heads as experts (>= 1), got {len(experts)} experts and {len(heads)} heads")
        self.trunk = trunk
        self.experts = nn.ModuleList(experts)
        self.heads = nn.ModuleList(heads)
        self.num_experts = len(experts)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.scale = float(scale)
        self._model_args = dict(model_args)

    @property
    def model_args(self) -> dict[str, Any]:
        """The create_model keyword arguments (name included) that rebuild this architecture."""
        return dict(self._model_args)

    @property
    def name(self) -> str:
        return str(self._model_args.get("name", type(self).__name__))

    def forward_trunk(self, x: Tensor) -> Tensor:
        """Shared stem and shared stages: [B, 3, h, w] -> [B, Ct, H, W]."""
        return self.trunk(x)

    def forward_expert(self, i: int, trunk_out: Tensor) -> tuple[Tensor, Tensor]:
        """Expert i on a trunk output (any subset of images): -> (logits [B, C], feature [B, D])."""
        feature = self.experts[i](trunk_out)
        return self.heads[i](feature), feature

    def forward(self, x: Tensor) -> RIDEOutput:
        trunk_out = self.forward_trunk(x)
        logits, features = [], []
        for i in range(self.num_experts):
            z, f = self.forward_expert(i, trunk_out)
            logits.append(z)
            features.append(f)
        expert_logits = torch.stack(logits)  # [E, B, C]
        return RIDEOutput(expert_logits.mean(dim=0), expert_logits, torch.stack(features))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict that also accepts a BatchedRIDENet's state dict (converted)."""
        if not self.batched and is_batched_layout(state_dict):
            state_dict = per_expert_state_dict(state_dict, self.num_experts)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_classes={self.num_classes}, feature_dim={self.feature_dim}, scale={self.scale:g}"


class ExpertBranch(nn.Sequential):
    """An expert's own stages (named like the original, e.g. layer2, layer3), then global average
    pooling: [B, Ct, H, W] -> [B, D]. Pooling is adaptive, so any input resolution works."""

    def __init__(self, stages: dict[str, nn.Module]) -> None:
        super().__init__()
        for stage_name, stage in stages.items():
            self.add_module(stage_name, stage)
        self.stage_names: tuple[str, ...] = tuple(stages)
        self.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.add_module("flatten", nn.Flatten(1))
