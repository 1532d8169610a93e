"""RIDENet forward: shapes and types for every registered model, trunk/expert/head separation,
channels_last, initialisation, option-A shortcuts and argument checks.

Shape legend: B images, E experts, C classes, D expert feature width.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from ride_fast.models import CosineHead, NormedLinear, RIDENet, RIDEOutput, create_model, list_models
from ride_fast.models.resnet_cifar import CifarBasicBlock

NAMES = list_models()
B, C, PX = 2, 10, 64  # 64 px works for every family thanks to adaptive pooling


def _is_cheap(name: str) -> bool:
    """Models under 10 M parameters at E = 1 are tested with every expert count 1..8."""
    with torch.device("meta"):
        model = create_model(name, num_classes=C, num_experts=1)
    return sum(p.numel() for p in model.parameters()) < 10e6


SHAPE_CASES = [(n, e) for n in NAMES for e in (range(1, 9) if _is_cheap(n) else (1, 3))]


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, PX, PX, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("name,num_experts", SHAPE_CASES, ids=[f"{n}-E{e}" for n, e in SHAPE_CASES])
def test_forward_shapes_and_consistency(name, num_experts):
    torch.manual_seed(0)
    model = create_model(name, num_classes=C, num_experts=num_experts).eval()
    assert isinstance(model, RIDENet)
    assert (model.num_experts, model.num_classes, model.scale) == (num_experts, C, 30.0)
    assert len(model.experts) == len(model.heads) == num_experts
    D = model.feature_dim
    x = _images()
    out = model(x)
    assert isinstance(out, RIDEOutput) and isinstance(out, tuple)
    assert out.logits.shape == (B, C)
    assert out.expert_logits.shape == (num_experts, B, C)
    assert out.features.shape == (num_experts, B, D)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out.logits, out.expert_logits.mean(0))
    # cosine heads: |logit| <= s
    assert out.expert_logits.abs().max() <= model.scale * (1 + 1e-5)

    # forward_trunk + forward_expert reproduce forward, also on a subset of images (routing)
    trunk_out = model.forward_trunk(x)
    for i in range(num_experts):
        z, f = model.forward_expert(i, trunk_out)
        torch.testing.assert_close(z, out.expert_logits[i])
        torch.testing.assert_close(f, out.features[i])
    z1, f1 = model.forward_expert(num_experts - 1, trunk_out[1:])
    torch.testing.assert_close(z1, out.expert_logits[-1, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f1, out.features[-1, 1:], rtol=1e-4, atol=1e-4)
    z0, f0 = model.forward_expert(0, trunk_out[:0])  # a router may leave no image for an expert
    assert z0.shape == (0, C) and f0.shape == (0, D)

    # model_args rebuild the same architecture
    args = model.model_args
    assert args == dict(name=name, num_classes=C, num_experts=num_experts, reduce_dimension=True, use_norm=True)
    with torch.device("meta"):
        rebuilt = create_model(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(1)
    model = create_model(name, num_classes=C, num_experts=2).eval()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = _images(1)
    ref = model(x)
    got = cl(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_linear_heads_without_norm(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=C, num_experts=2, reduce_dimension=False, use_norm=False)
    assert model.scale == 1.0
    assert all(type(h) is nn.Linear and h.bias is not None and h.weight.shape == (C, model.feature_dim) for h in model.heads)
    assert model.feature_dim in (64, 512, 2048)


def test_train_mode_backward_reaches_every_parameter():
    torch.manual_seed(2)
    model = create_model("resnet32", num_classes=C, num_experts=2).train()
    out = model(torch.randn(4, 3, 32, 32))
    (out.expert_logits.logsumexp(-1).sum() + out.features.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace:DeprecationWarning")
def test_jit_trace_handles_the_output():
    model = create_model("resnet32", num_classes=C, num_experts=2).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x)
    for a, b in zip(traced(x), model(x)):
        torch.testing.assert_close(a, b)


def test_normed_linear():
    torch.manual_seed(3)
    head = NormedLinear(48, 7)
    assert head.weight.shape == (48, 7)
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(7))
    x = torch.randn(5, 48)
    expected = (x / x.norm(dim=1, keepdim=True)) @ (head.weight / head.weight.norm(dim=0, keepdim=True))
    torch.testing.assert_close(head(x), expected)
    scaled = CosineHead(48, 7)
    scaled.weight.data.copy_(head.weight.data)
    torch.testing.assert_close(scaled(x), 30 * expected)


@torch.no_grad()
def test_initialisation():
    torch.manual_seed(4)
    cifar = create_model("resnet32", num_classes=C, num_experts=1, use_norm=False)
    w = cifar.experts[0].layer3[1].conv1.weight  # kaiming_normal_, fan_in = 48 * 9 (reduced)
    assert abs(w.std().item() / math.sqrt(2 / (48 * 9)) - 1) < 0.05
    lin = cifar.heads[0].weight  # kaiming_normal_ also on nn.Linear (fan_in = D = 48)
    assert abs(lin.std().item() / math.sqrt(2 / 48) - 1) < 0.15
    imnet = create_model("resnet10", num_classes=C, num_experts=1)
    w = imnet.trunk.conv1.weight  # N(0, sqrt(2 / (7 * 7 * 64)))
    assert abs(w.std().item() / math.sqrt(2 / (7 * 7 * 64)) - 1) < 0.05
    w = imnet.experts[0].layer4[0].downsample[0].weight  # 1x1 conv: sqrt(2 / out_channels)
    assert abs(w.std().item() / math.sqrt(2 / 384) - 1) < 0.05
    bns = [m for m in imnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)


def test_option_a_shortcut_is_parameter_free_and_pads_equally():
    block = CifarBasicBlock(16, 24, stride=2)
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 24, 4, 4)
    assert (s[:, :4] == 0).all() and (s[:, 20:] == 0).all()
    torch.testing.assert_close(s[:, 4:20], x[:, :, ::2, ::2])


def test_resnext_group_widths():
    with torch.device("meta"):
        model = create_model("resnext50_32x4d", num_classes=C, num_experts=1)
    widths = [model.trunk.layer1[0].conv2.out_channels, model.trunk.layer2[0].conv2.out_channels,
              model.experts[0].layer3[0].conv2.out_channels, model.experts[0].layer4[0].conv2.out_channels]
    assert widths == [128, 256, 384, 768]
    assert model.trunk.layer1[0].conv2.groups == 32 and model.feature_dim == 1536


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"resnext50_32x4d") as info:
        create_model("resnext50_32x8d", num_classes=C, num_experts=2)
    assert "Did you mean 'resnext50_32x4d'" in str(info.value)
    for name in NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 'resnet32'"):
        create_model("resnet_32", num_classes=C)


@pytest.mark.parametrize("num_experts", [0, 9, -1])
def test_num_experts_out_of_range(num_experts):
    with pytest.raises(ValueError, match=r"num_experts must be in 1\.\.8"):
        create_model("resnet32", num_classes=C, num_experts=num_experts)


@pytest.mark.parametrize("num_classes", [1, 0])
def test_num_classes_too_small(num_classes):
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("resnet32", num_classes=num_classes, num_experts=2)


def test_non_integer_arguments():
    with pytest.raises(ValueError, match="num_experts must be an integer"):
        create_model("resnet32", num_classes=C, num_experts=2.0)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        create_model("resnet32", num_classes="10", num_experts=2)
