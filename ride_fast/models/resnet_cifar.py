"""CIFAR ResNet-32 (the LDAM-DRW / RIDE variant) split into a shared trunk and expert branches.

Shape legend: B images, E experts, C classes, D = expert feature width (48 reduced, 64 not).

    x          [B, 3, 32, 32]
    trunk      conv3x3(3->16) -> BN -> ReLU -> layer1 (5 BasicBlocks, 16 ch)    [B, 16, 32, 32]
    expert i   layer2 (5 blocks, 24 | 32 ch, stride 2) -> layer3 (5 blocks,
               48 | 64 ch, stride 2) -> global average pool                    [B, D]
    head i     cosine (s = 30) or Linear (s = 1)                                [B, C]

Shortcuts are "option A" (parameter-free): subsample x[:, :, ::2, ::2], then zero-pad the
channels equally on both sides (16->24 pads 4+4, 24->48 pads 12+12). Init: kaiming_normal_
(fan_in) on every Conv2d and nn.Linear, BatchNorm left at its defaults.

Parameter names follow the original (conv1, bn1, layer1.{b}.conv1 ...) so that
`ride_fast.models.convert` maps original checkpoints by renaming only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.models.heads import make_head
from ride_fast.models.registry import register_model
from ride_fast.models.ride import ExpertBranch, RIDENet
from ride_fast.ops.batch_norm_act import batch_norm_act
from ride_fast.ops.conv3x3 import conv3x3

# (stage widths when reduce_dimension, when not) for the per-expert stages layer2 and layer3.
_REDUCED = (24, 48)
_FULL = (32, 64)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: spatial subsampling by `stride`, then symmetric zero channel padding."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if (planes - in_planes) % 2 or planes < in_planes:
            raise ValueError(f"option-A shortcut pads channels equally on both sides: {in_planes} -> {planes} is not possible")
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3x3 convs without bias."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, conv3x3(self.conv1, x))
        return batch_norm_act(self.bn2, conv3x3(self.conv2, out), self.shortcut(x))


def make_cifar_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """num_blocks CifarBasicBlocks; the first one carries the stride and the width change."""
    blocks = [CifarBasicBlock(in_planes, planes, stride)]
    blocks += [CifarBasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _init_cifar(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def build_cifar_resnet(
    name: str,
    num_blocks: tuple[int, int, int],
    num_classes: int,
    num_experts: int,
    reduce_dimension: bool,
    use_norm: bool,
) -> RIDENet:
    """A CIFAR ResNet-(6n+2) RIDE network: shared stem + layer1, per-expert layer2 + layer3."""
    width2, width3 = _REDUCED if reduce_dimension else _FULL
    trunk = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False),
            bn1=nn.BatchNorm2d(16),
            relu=nn.ReLU(inplace=True),
            layer1=make_cifar_stage(16, 16, num_blocks[0], 1),
        )
    )
    experts = [
        ExpertBranch(
            {
                "layer2": make_cifar_stage(16, width2, num_blocks[1], 2),
                "layer3": make_cifar_stage(width2, width3, num_blocks[2], 2),
            }
        )
        for _ in range(num_experts)
    ]
    heads, scale = [], 1.0
    for _ in range(num_experts):
        head, scale = make_head(width3, num_classes, use_norm)
        heads.append(head)
    model = RIDENet(
        trunk,
        experts,
        heads,
        feature_dim=width3,
        num_classes=num_classes,
        scale=scale,
        model_args=dict(name=name, num_classes=num_classes, num_experts=num_experts, reduce_dimension=reduce_dimension, use_norm=use_norm),
    )
    _init_cifar(model)
    return model


@register_model("resnet32")  # CIFAR-100-LT
def resnet32(num_classes: int, num_experts: int, reduce_dimension: bool = True, use_norm: bool = True) -> RIDENet:
    """CIFAR ResNet-32: BasicBlocks [5, 5, 5], D = 48 (reduced) or 64."""
    return build_cifar_resnet("resnet32", (5, 5, 5), num_classes, num_experts, reduce_dimension, use_norm)
