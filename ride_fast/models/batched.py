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
dim 0 (convs, BN) or a stack (heads), and back a chunk / unbind: see `batched_state_dict`,
`per_expert_state_dict`, `to_batched`, `to_per_expert`. This is exact, not an approximation:
logits, features and gradients equal the per-expert network's up to floating-point summation order.

`forward_expert(i, trunk_out)` runs one expert alone with slices of the grouped weights (routed
inference). In training mode it updates the slices of the BatchNorm running statistics, but not
`num_batches_tracked` (only used when BatchNorm momentum is None, never in ride_fast).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.models.heads import CosineHead, full_precision
from ride_fast.models.output import RIDEOutput
from ride_fast.models.resnet import BasicBlock, Bottleneck
from ride_fast.models.resnet_cifar import CifarBasicBlock, OptionAShortcut
from ride_fast.models.ride import ExpertBranch, RIDENet

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


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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
        x = x[:, :, :: self.stride, :: self.stride]
        if _channels_last(x):  # pad the innermost (channel) axis of [B, h, w, E, c]: stays channels_last
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
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

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
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x), inplace=True)

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        out = F.relu(self.bn1.forward_expert(self.conv1.forward_expert(x, i), i), inplace=True)
        out = self.bn2.forward_expert(self.conv2.forward_expert(out, i), i)
        return F.relu(out + self.downsample.forward_expert(x, i), inplace=True)


class BatchedBottleneck(_BatchedImageNetBlock):
    """E ImageNet Bottlenecks (ResNeXt: 3x3 conv with groups E*32)."""

    convs = ("conv1", "conv2", "conv3")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x), inplace=True)

    def forward_expert(self, x: Tensor, i: int) -> Tensor:
        out = F.relu(self.bn1.forward_expert(self.conv1.forward_expert(x, i), i), inplace=True)
        out = F.relu(self.bn2.forward_expert(self.conv2.forward_expert(out, i), i), inplace=True)
        out = self.bn3.forward_expert(self.conv3.forward_expert(out, i), i)
        return F.relu(out + self.downsample.forward_expert(x, i), inplace=True)


_BLOCKS: dict[type, type[nn.Module]] = {
    CifarBasicBlock: BatchedCifarBasicBlock,
    BasicBlock: BatchedBasicBlock,
    Bottleneck: BatchedBottleneck,
}


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
                if type(block) not in _BLOCKS:
                    raise TypeError(f"no batched version of {type(block).__name__} (stage {name}, block {b})")
                blocks.append(_BLOCKS[type(block)](block, num_experts, shared_input=(s == 0 and b == 0)))
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

_PER_EXPERT_KEY = re.compile(r"^(?P<part>experts|heads)\.(?P<i>\d+)\.(?P<rest>.+)$")


def is_per_expert_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a RIDENet state dict holds per-expert keys (experts.{i}.*, heads.{i}.*)."""
    return any(_PER_EXPERT_KEY.match(k) for k in state_dict)


def is_batched_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a RIDENet state dict holds batched keys (experts.<stage>.*, heads.weight)."""
    return any(k.startswith(("experts.", "heads.")) for k in state_dict) and not is_per_expert_layout(state_dict)


def batched_state_dict(state_dict: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """Per-expert RIDENet state dict -> BatchedRIDENet state dict.

    experts.{i}.<rest> [n, ...] -> experts.<rest> [E*n, ...] (concatenated in expert order);
    heads.{i}.<rest> [...] -> heads.<rest> [E, ...] (stacked); 0-d tensors (BN num_batches_tracked)
    take expert 0's value; other keys (trunk.*) are kept.
    """
    groups: dict[str, dict[int, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _PER_EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
        else:
            groups.setdefault(f"{m['part']}.{m['rest']}", {})[int(m["i"])] = value
    for key, per in groups.items():
        if sorted(per) != list(range(num_experts)):
            raise ValueError(f"{key}: expected experts 0..{num_experts - 1} in the state dict, found {sorted(per)}")
        tensors = [per[i] for i in range(num_experts)]
        if key.startswith("heads."):
            out[key] = torch.stack(tensors)
        elif tensors[0].dim() == 0:
            out[key] = tensors[0]
        else:
            out[key] = torch.cat(tensors)
    return out


def per_expert_state_dict(state_dict: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """BatchedRIDENet state dict -> per-expert RIDENet state dict (the inverse of batched_state_dict)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part == "heads":
            parts = value.unbind(0)
        elif part == "experts":
            if value.dim() == 0:
                parts = (value,) * num_experts
            else:
                if value.shape[0] % num_experts:
                    raise ValueError(f"{key}: dim 0 of size {value.shape[0]} does not split into {num_experts} experts")
                parts = value.chunk(num_experts)
        else:
            out[key] = value
            continue
        if len(parts) != num_experts:
            raise ValueError(f"{key}: holds {len(parts)} experts, expected {num_experts}")
        for i, t in enumerate(parts):
            out[f"{part}.{i}.{rest}"] = t.clone()
    return out


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
    from ride_fast.models.registry import create_model

    args = {k: v for k, v in model.model_args.items() if k != "batched"}
    ref = next(model.parameters())
    with torch.device("meta"):
        per = create_model(**args)
    per = per.to_empty(device=ref.device).to(dtype=ref.dtype)
    per.load_state_dict(per_expert_state_dict(model.state_dict(), model.num_experts))
    return per.train(model.training)
