"""ImageNet-style ResNet-10 / ResNet-50 / ResNeXt-50 32x4d split into trunk and expert branches.

Shape legend: B images, E experts, C classes, expansion x = 1 (BasicBlock) or 4 (Bottleneck),
D = x * layer4 planes (384 -> D = 384 for ResNet-10, 1536 for the Bottleneck nets, reduced).

    x          [B, 3, h, w]                            224 px in the recipes; any size >= 32 works
    trunk      conv7x7/2 (64) -> BN -> ReLU -> maxpool3x3/2 -> layer1 (planes 64)
               -> layer2 (planes 128, stride 2)        [B, 128x, h/8, w/8]
    expert i   layer3 (planes 192 | 256, stride 2) -> layer4 (planes 384 | 512, stride 2)
               -> adaptive global average pool         [B, D]
    head i     cosine (s = 30) or Linear (s = 1)       [B, C]

Bottleneck width per stage: int(planes * width_per_group / 64) * groups (ResNeXt-50 32x4d:
128 / 256 / 384 / 768 reduced). Downsample shortcut: 1x1 conv with stride + BN. Init: every
conv ~ N(0, sqrt(2 / (k*k*out_channels))), BN gamma 1, beta 0, Linear heads at PyTorch defaults
(the original initialises its convs before it creates the classifiers).

Module names follow the original (conv1, bn1, layer1.{b}.conv2, layer1.0.downsample.0 ...), so
original checkpoints map by renaming only (`ride_fast.models.convert`).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn as nn
from torch import Tensor

from ride_fast.models.heads import make_head
from ride_fast.models.registry import register_model
from ride_fast.models.ride import ExpertBranch, RIDENet
from ride_fast.ops.batch_norm_act import batch_norm_act
from ride_fast.ops.conv3x3 import conv3x3

_REDUCED = (192, 384)  # layer3, layer4 planes with reduce_dimension
_FULL = (256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convs; relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, conv3x3(self.conv1, x))
        residual = x if self.downsample is None else self.downsample(x)
        return batch_norm_act(self.bn2, conv3x3(self.conv2, out), residual)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, groups) -> 1x1 expand (x4), plus shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, self.conv1(x))
        out = batch_norm_act(self.bn2, conv3x3(self.conv2, out))
        residual = x if self.downsample is None else self.downsample(x)
        return batch_norm_act(self.bn3, self.conv3(out), residual)


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(block: Block, inplanes: int, planes: int, num_blocks: int, stride: int = 1, groups: int = 1, base_width: int = 64) -> nn.Sequential:
    """num_blocks blocks; the first carries the stride and, if needed, a 1x1 conv + BN shortcut."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))
    blocks = [block(inplanes, planes, stride, downsample, groups, base_width)]
    blocks += [block(out_planes, planes, 1, None, groups, base_width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _init_imagenet(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_imagenet_resnet(
    name: str,
    block: Block,
    layers: tuple[int, int, int, int],
    num_classes: int,
    num_experts: int,
    reduce_dimension: bool,
    use_norm: bool,
    groups: int = 1,
    width_per_group: int = 64,
) -> RIDENet:
    """A RIDE ImageNet ResNet/ResNeXt: shared stem + layer1 + layer2, per-expert layer3 + layer4."""
    planes3, planes4 = _REDUCED if reduce_dimension else _FULL
    x = block.expansion
    stage = dict(groups=groups, base_width=width_per_group)
    trunk = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            bn1=nn.BatchNorm2d(64),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            layer1=make_stage(block, 64, 64, layers[0], 1, **stage),
            layer2=make_stage(block, 64 * x, 128, layers[1], 2, **stage),
        )
    )
    experts = [
        ExpertBranch(
            {
                "layer3": make_stage(block, 128 * x, planes3, layers[2], 2, **stage),
                "layer4": make_stage(block, planes3 * x, planes4, layers[3], 2, **stage),
            }
        )
        for _ in range(num_experts)
    ]
    _init_imagenet(trunk)
    for expert in experts:
        _init_imagenet(expert)
    feature_dim = planes4 * x
    heads, scale = [], 1.0
    for _ in range(num_experts):
        head, scale = make_head(feature_dim, num_classes, use_norm)
        heads.append(head)
    return RIDENet(
        trunk,
        experts,
        heads,
        feature_dim=feature_dim,
        num_classes=num_classes,
        scale=scale,
        model_args=dict(name=name, num_classes=num_classes, num_experts=num_experts, reduce_dimension=reduce_dimension, use_norm=use_norm),
    )


@register_model("resnet10")  # ImageNet-LT
def resnet10(num_classes: int, num_experts: int, reduce_dimension: bool = True, use_norm: bool = True) -> RIDENet:
    """ResNet-10: BasicBlock [1, 1, 1, 1], D = 384 (reduced) or 512."""
    return build_imagenet_resnet("resnet10", BasicBlock, (1, 1, 1, 1), num_classes, num_experts, reduce_dimension, use_norm)


@register_model("resnet50")  # ImageNet-LT, iNaturalist 2018
def resnet50(num_classes: int, num_experts: int, reduce_dimension: bool = True, use_norm: bool = True) -> RIDENet:
    """ResNet-50: Bottleneck [3, 4, 6, 3], D = 1536 (reduced) or 2048."""
    return build_imagenet_resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, num_experts, reduce_dimension, use_norm)


@register_model("resnext50_32x4d")  # ImageNet-LT
def resnext50_32x4d(num_classes: int, num_experts: int, reduce_dimension: bool = True, use_norm: bool = True) -> RIDENet:
    """ResNeXt-50 32x4d: Bottleneck [3, 4, 6, 3], 32 groups of width 4, D = 1536 (reduced) or 2048."""
    return build_imagenet_resnet("resnext50_32x4d", Bottleneck, (3, 4, 6, 3), num_classes, num_experts, reduce_dimension, use_norm, groups=32, width_per_group=4)
