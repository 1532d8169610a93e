"""Building blocks of the batched experts: E experts' layers as one grouped layer (docs/method.md §2).

Shape legend: B images, E experts, o / i output / input channels of one expert's convolution,
g its groups (1, or 32 for ResNeXt), k kernel size, c channels of one expert.

Layers (ExpertConv2d, ExpertBatchNorm2d, ExpertOptionAShortcut, ExpertIdentity, ExpertSequential)
hold E experts' weights with expert e owning the channel block [e*o, (e+1)*o); each has
`forward(x)` for all experts and `forward_expert(x, i)` for expert i alone on its slice. Blocks
(BatchedCifarBasicBlock, BatchedBasicBlock, BatchedBottleneck) have the per-expert blocks'
parameter names and forward, E experts at once; `BATCHED_BLOCKS` maps a per-expert block type to
its batched version. ride_fast.models.batched assembles them into a BatchedRIDENet.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.models.resnet import BasicBlock, Bottleneck
from ride_fast.models.resnet_cifar import CifarBasicBlock, OptionAShortcut
from ride_fast.ops.batch_norm_act import batch_norm_act, channels_last_only
from ride_fast.ops.conv3x3 import conv3x3

# --------------------------------------------------------------------------------------------
# layers


class ExpertConv2d(nn.Conv2d):
    """E experts' convolutions as one grouped Conv2d; weight [E*o, i/g, k, k], expert e owns rows
    [e*o, (e+1)*o).

    shared_input: every expert reads the same input [B, i, H, W] (groups g must be 1); otherwise
    the input is [B, E*i, H, W] and the conv has groups E*g (block diagonal).
    """

    def __init__(self, in_per_expert: int, out_per_expert: int, kernel_size: int, *, num_experts: int, shared_input: bool,
                 stride: int = 1, padding: int = 0, groups_per_expert: int = 1, bias: bool = False) -> None:
        if shared_input and groups_per_expert != 1:
            raise ValueError("a conv on the shared trunk output must have groups=1 per expert to be batched by concatenation")
        E = num_experts
        super().__init__(in_per_expert if shared_input else E * in_per_expert, E * out_per_expert, kernel_size,
                         stride=stride, padding=padding, groups=groups_per_expert if shared_input else E * groups_per_expert, bias=bias)
        self.num_experts = E
        self.shared_input = shared_input
        self.groups_per_expert = groups_per_expert

    @classmethod
    def like(cls, conv: nn.Conv2d, num_experts: int, shared_input: bool) -> ExpertConv2d:
        """The batched version of one expert's `conv` (weights not copied)."""
        if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"cannot batch {conv}: only square, undilated, zero-padded convolutions")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], num_experts=num_experts, shared_input=shared_input,
                   stride=conv.stride[0], padding=conv.padding[0], groups_per_expert=conv.groups, bias=conv.bias is not None)

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        """Expert i alone: [B, i, H, W] -> [B, o, H', W'] with its slice of the weight."""
        o = self.out_channels // self.num_experts
        bias = None if self.bias is None else self.bias[i * o : (i + 1) * o]
        return F.conv2d(x, self.weight[i * o : (i + 1) * o], bias, self.stride, self.padding, self.dilation, self.groups_per_expert)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_experts={self.num_experts}, shared_input={self.shared_input}"


class ExpertBatchNorm2d(nn.BatchNorm2d):
    """One BatchNorm2d over E*c channels (per-channel statistics, so exactly E separate BNs)."""

    def __init__(self, num_features_per_expert: int, *, num_experts: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_experts * num_features_per_expert, eps=eps, momentum=momentum)
        self.num_experts = num_experts

    @classmethod
    def like(cls, bn: nn.BatchNorm2d, num_experts: int) -> ExpertBatchNorm2d:
        if not (bn.affine and bn.track_running_stats):
            raise ValueError(f"cannot batch {bn}: needs affine=True and track_running_stats=True")
        return cls(bn.num_features, num_experts=num_experts, eps=bn.eps, momentum=bn.momentum)

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        """Expert i alone: [B, c, H, W] with its slices of weight, bias and running statistics."""
        c = self.num_features // self.num_experts
        s = slice(i * c, (i + 1) * c)
        assert self.running_mean is not None and self.running_var is not None
        momentum = 0.0 if self.momentum is None else self.momentum
        # training: batch statistics, and the running-stat slices (views) are updated in place
        return F.batch_norm(x, self.running_mean[s], self.running_var[s], self.weight[s], self.bias[s], self.training, momentum, self.eps)


class ExpertOptionAShortcut(nn.Module):
    """Option-A shortcut of E experts: x[:, :, ::s, ::s], then each expert's channel block zero-padded
    by `pad` on both sides. shared_input: [B, i, H, W] -> [B, E*(i+2p), h, w] (the same padded copy
    per expert); else [B, E*i, H, W] -> [B, E*(i+2p), h, w]. Keeps the input's memory format."""

    def __init__(self, in_planes: int, planes: int, stride: int, *, num_experts: int, shared_input: bool) -> None:
        super().__init__()
        self.per_expert = OptionAShortcut(in_planes, planes, stride)  # validates and does forward_expert
        self.in_planes, self.stride, self.pad = in_planes, stride, self.per_expert.pad
        self.num_experts, self.shared_input = num_experts, shared_input

    def forward(self, x: Tensor) -> Tensor:
        E, c, p = self.num_experts, self.in_planes, self.pad
        channels_last = channels_last_only(x)  # of the input: its strided subsample is contiguous in neither format
        x = x[:, :, :: self.stride, :: self.stride]
        if channels_last:  # pad the innermost (channel) axis of [B, h, w, E, c]: stays channels_last
            y = x.permute(0, 2, 3, 1)
            y = y.unsqueeze(3).expand(*y.shape[:3], E, c) if self.shared_input else y.unflatten(3, (E, c))
            return F.pad(y, (p, p)).flatten(3).permute(0, 3, 1, 2)
        y = x.unsqueeze(1).expand(x.shape[0], E, *x.shape[1:]) if self.shared_input else x.unflatten(1, (E, c))
        return F.pad(y, (0, 0, 0, 0, p, p)).flatten(1, 2)

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        return self.per_expert(x)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}, num_experts={self.num_experts}, shared_input={self.shared_input}"


class ExpertIdentity(nn.Identity):
    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        return x


class ExpertSequential(nn.Sequential):
    """nn.Sequential whose `forward_expert(x, i)` calls every child's forward_expert."""

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        for module in self:
            x = module.forward_expert(x, i)
        return x


# --------------------------------------------------------------------------------------------
# blocks: same parameter names and forward as the per-expert blocks, E experts at once


class BatchedCifarBasicBlock(nn.Module):
    """E CifarBasicBlocks: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, block: CifarBasicBlock, num_experts: int, shared_input: bool) -> None:
        super().__init__()
        E = num_experts
        self.conv1 = ExpertConv2d.like(block.conv1, E, shared_input)
        self.bn1 = ExpertBatchNorm2d.like(block.bn1, E)
        self.conv2 = ExpertConv2d.like(block.conv2, E, False)
        self.bn2 = ExpertBatchNorm2d.like(block.bn2, E)
        if isinstance(block.shortcut, OptionAShortcut) or shared_input:
            in_planes, planes = block.conv1.in_channels, block.conv1.out_channels
            self.shortcut: nn.Module = ExpertOptionAShortcut(in_planes, planes, block.conv1.stride[0], num_experts=E, shared_input=shared_input)
        else:
            self.shortcut = ExpertIdentity()

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, conv3x3(self.conv1, x))
        return batch_norm_act(self.bn2, conv3x3(self.conv2, out), self.shortcut(x))

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        out = F.relu(self.bn1.forward_expert(self.conv1.forward_expert(x, i), i))
        out = self.bn2.forward_expert(self.conv2.forward_expert(out, i), i)
        return F.relu(out + self.shortcut.forward_expert(x, i))


class _BatchedImageNetBlock(nn.Module):
    """Shared code of the batched BasicBlock / Bottleneck: convs, BNs and the downsample shortcut."""

    convs: tuple[str, ...] = ()

    def __init__(self, block: nn.Module, num_experts: int, shared_input: bool) -> None:
        super().__init__()
        E = num_experts
        for n, name in enumerate(self.convs, start=1):
            self.add_module(name, ExpertConv2d.like(getattr(block, name), E, shared_input and n == 1))
            self.add_module(f"bn{n}", ExpertBatchNorm2d.like(getattr(block, f"bn{n}"), E))
        if block.downsample is not None:
            conv, bn = block.downsample
            self.downsample: nn.Module = ExpertSequential(ExpertConv2d.like(conv, E, shared_input), ExpertBatchNorm2d.like(bn, E))
        elif shared_input:  # identity shortcut from the shared input: one copy per expert
            c = block.conv1.in_channels
            self.downsample = ExpertOptionAShortcut(c, c, 1, num_experts=E, shared_input=True)
        else:
            self.downsample = ExpertIdentity()


class BatchedBasicBlock(_BatchedImageNetBlock):
    """E ImageNet BasicBlocks."""

    convs = ("conv1", "conv2")

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, conv3x3(self.conv1, x))
        return batch_norm_act(self.bn2, conv3x3(self.conv2, out), self.downsample(x))

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        out = F.relu(self.bn1.forward_expert(self.conv1.forward_expert(x, i), i), inplace=True)
        out = self.bn2.forward_expert(self.conv2.forward_expert(out, i), i)
        return F.relu(out + self.downsample.forward_expert(x, i), inplace=True)


class BatchedBottleneck(_BatchedImageNetBlock):
    """E ImageNet Bottlenecks (ResNeXt: 3x3 conv with groups E*32)."""

    convs = ("conv1", "conv2", "conv3")

    def forward(self, x: Tensor) -> Tensor:
        out = batch_norm_act(self.bn1, self.conv1(x))
        out = batch_norm_act(self.bn2, conv3x3(self.conv2, out))
        return batch_norm_act(self.bn3, self.conv3(out), self.downsample(x))

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        out = F.relu(self.bn1.forward_expert(self.conv1.forward_expert(x, i), i), inplace=True)
        out = F.relu(self.bn2.forward_expert(self.conv2.forward_expert(out, i), i), inplace=True)
        out = self.bn3.forward_expert(self.conv3.forward_expert(out, i), i)
        return F.relu(out + self.downsample.forward_expert(x, i), inplace=True)


BATCHED_BLOCKS: dict[type, type[nn.Module]] = {
    CifarBasicBlock: BatchedCifarBasicBlock,
    BasicBlock: BatchedBasicBlock,
    Bottleneck: BatchedBottleneck,
}
