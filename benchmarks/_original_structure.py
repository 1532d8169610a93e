"""The baseline of the train-step benchmark: a RIDE training step structured like the original code
(frank-xwang/RIDE-LongTailRecognition), written here from the paper (docs/method.md §2, §3) and that code's structure.

Shape legend: B images, E experts, C classes, D expert feature width.

What makes it "original-structured" (docs/method.md §10), kept on purpose:

- model: the ResNet with ModuleLists of per-expert stages (`layer2s`/`layer3s` for CIFAR,
  `layer3s`/`layer4s` for ImageNet) and `linears`, and a Python loop over experts
  (`_separate_part`) whose outputs are stacked to [B, E, C] and averaged; NCHW, float32.
- loss: a loop over experts; per expert an LDAM margin subtraction (one-hot mask, a [1, C] @ [C, B]
  matmul for the batch margins, torch.where), F.cross_entropy with the DRW weights, log_softmax
  with the temperature, the softmax of the mean logits recomputed under no_grad, F.kl_div
  (batchmean), and `temperature.mean().item()` per expert (a host sync, as in the original).
- step: zero_grad, backward, torch.optim.SGD with PyTorch's default implementation choice
  (per-parameter loop on the CPU, foreach on CUDA), and `loss.item()` plus an accuracy `.item()`
  per step (the original trainer's per-step metric update).

Left out (so the baseline is, if anything, flattered): the original's stack of the pre-pooling
feature maps of all experts (`feat_before_GAP`) and its uint8 mask (a bool mask here; current
PyTorch rejects uint8 in torch.where).

Parameter names follow the original, so `ride_fast.models.load_original_state_dict` loads this
model's state dict into a ride_fast RIDENet (the benchmark tests check the two give equal logits).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------- model


class NormedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class LambdaLayer(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class CifarBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = (planes - in_planes) // 2
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class OriginalCifarRIDE(nn.Module):
    """ResNet-32 RIDE as the original's ResNet_s (reduce_dimension: 24 / 48 channels per expert)."""

    def __init__(self, num_classes: int, num_experts: int, use_norm: bool = True, s: float = 30.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 5, 1)
        start = self.in_planes
        self.layer2s = nn.ModuleList([self._make_layer(24, 5, 2, start) for _ in range(num_experts)])
        start = self.in_planes
        self.layer3s = nn.ModuleList([self._make_layer(48, 5, 2, start) for _ in range(num_experts)])
        if use_norm:
            self.linears = nn.ModuleList([NormedLinear(48, num_classes) for _ in range(num_experts)])
        else:
            self.linears = nn.ModuleList([nn.Linear(48, num_classes) for _ in range(num_experts)])
            s = 1.0
        self.s = s
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int, in_planes: int | None = None) -> nn.Sequential:
        self.in_planes = self.in_planes if in_planes is None else in_planes
        layers = []
        for st in [stride] + [1] * (num_blocks - 1):
            layers.append(CifarBlock(self.in_planes, planes, st))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _separate_part(self, x: Tensor, ind: int) -> Tensor:
        out = self.layer2s[ind](x)
        out = self.layer3s[ind](out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        self.feat.append(out)
        return self.linears[ind](out) * self.s

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        outs = []
        self.feat: list[Tensor] = []
        for ind in range(self.num_experts):
            outs.append(self._separate_part(out, ind))
        feat = torch.stack(self.feat, dim=1)
        final_out = torch.stack(outs, dim=1).mean(dim=1)
        return {"output": final_out, "feat": feat, "logits": torch.stack(outs, dim=1)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class OriginalResNet50RIDE(nn.Module):
    """ResNet-50 RIDE as the original's fb_resnets ResNet (reduce_dimension: planes 192 / 384)."""

    def __init__(self, num_classes: int, num_experts: int, use_norm: bool = True, s: float = 30.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, 2)
        start = self.inplanes
        self.layer3s = nn.ModuleList([self._make_layer(192, 6, 2, start) for _ in range(num_experts)])
        start = self.inplanes
        self.layer4s = nn.ModuleList([self._make_layer(384, 3, 2, start) for _ in range(num_experts)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the original's fixed 7x7 pool only works at 224 px
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        if use_norm:
            self.linears = nn.ModuleList([NormedLinear(1536, num_classes) for _ in range(num_experts)])
        else:
            self.linears = nn.ModuleList([nn.Linear(1536, num_classes) for _ in range(num_experts)])
            s = 1.0
        self.s = s

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, inplanes: int | None = None) -> nn.Sequential:
        self.inplanes = self.inplanes if inplanes is None else inplanes
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _separate_part(self, x: Tensor, ind: int) -> Tensor:
        x = self.layer3s[ind](x)
        x = self.layer4s[ind](x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        self.feat.append(x)
        return self.linears[ind](x) * self.s

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        outs = []
        self.feat: list[Tensor] = []
        for ind in range(self.num_experts):
            outs.append(self._separate_part(x, ind))
        final_out = torch.stack(outs, dim=1).mean(dim=1)
        return {"output": final_out, "feat": torch.stack(self.feat, dim=1), "logits": torch.stack(outs, dim=1)}


ORIGINAL_MODELS = {"resnet32": OriginalCifarRIDE, "resnet50": OriginalResNet50RIDE}


# ---------------------------------------------------------------------------------- loss


class OriginalRIDELoss(nn.Module):
    """The original RIDELoss in its DRW phase: a loop over experts (see the module docstring).

    m_list [C] LDAM margins (max 0.5, multiplied by s here as in the original), per_cls_weights [C]
    DRW weights, per_cls_weights_diversity [C] the temperature factors t_c.
    """

    def __init__(self, class_counts: list[int], max_m: float = 0.5, s: float = 30.0, diversity_factor: float = -0.45,
                 reweight_factor: float = 0.05, beta: float = 0.9999, base_temperature: float = 1.0) -> None:
        super().__init__()
        counts = torch.tensor(class_counts, dtype=torch.float64)
        m = 1.0 / counts.sqrt().sqrt()
        self.register_buffer("m_list", (m * (max_m / m.max())).float())
        w = (1.0 - beta) / (1.0 - beta**counts)
        self.register_buffer("per_cls_weights", (w / w.sum() * len(counts)).float())
        t = len(counts) * counts / counts.sum() * reweight_factor + 1 - reweight_factor
        self.register_buffer("per_cls_weights_diversity", (t / t.max()).float())
        self.s, self.diversity_factor, self.base_temperature = s, diversity_factor, base_temperature

    def get_final_output(self, x: Tensor, target: Tensor) -> Tensor:
        index = torch.zeros_like(x, dtype=torch.bool)
        index.scatter_(1, target.data.view(-1, 1), 1)
        index_float = index.float()
        batch_m = torch.matmul(self.m_list[None, :], index_float.transpose(0, 1))
        batch_m = batch_m.view((-1, 1))
        x_m = x - batch_m * self.s
        return torch.where(index, x_m, x)

    def forward(self, output_logits: Tensor, target: Tensor, extra_info: dict[str, Tensor]) -> Tensor:
        loss = 0.0
        for logits_item in extra_info["logits"]:
            final_output = self.get_final_output(logits_item, target)
            loss += F.cross_entropy(final_output, target, weight=self.per_cls_weights)
            diversity_temperature = self.base_temperature * self.per_cls_weights_diversity.view((1, -1))
            temperature_mean = diversity_temperature.mean().item()
            output_dist = F.log_softmax(logits_item / diversity_temperature, dim=1)
            with torch.no_grad():
                mean_output_dist = F.softmax(output_logits / diversity_temperature, dim=1)
            loss += self.diversity_factor * temperature_mean * temperature_mean * F.kl_div(output_dist, mean_output_dist, reduction="batchmean")
        return loss


# ---------------------------------------------------------------------------------- step


def make_original_step(model: nn.Module, criterion: OriginalRIDELoss, lr: float = 0.1, weight_decay: float = 5e-4):
    """One training step as the original trainer runs it: returns `step(images, labels) -> float`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    model.train()

    def step(images: Tensor, labels: Tensor) -> float:
        output = model(images)
        loss = criterion(output_logits=output["output"], target=labels, extra_info={"logits": output["logits"].transpose(0, 1)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # the original trainer's per-step metric update (host reads)
        loss_value = loss.item()
        _correct = (torch.argmax(output["output"], dim=1) == labels).sum().item()
        return loss_value

    return step
