"""Batched experts (ride_fast.models.batched): the grouped network equals the per-expert one.

Shape legend: B images, E experts, C classes, D expert feature width.

For every registered model: equal logits, features and parameter gradients in float64 (train mode,
so BatchNorm uses batch statistics), equal parameter counts and initial weights for the same seed,
weight conversion both ways, either state-dict layout loads into either model, original-code
weights load into a batched model, forward_expert on the grouped weights, channels_last.
"""
import re

import pytest
import torch

from ride_fast.models import (
    BatchedRIDENet,
    CheckpointMismatchError,
    RIDENet,
    RIDEOutput,
    batched_state_dict,
    create_model,
    list_models,
    load_original_state_dict,
    per_expert_state_dict,
    to_batched,
    to_per_expert,
)
from ride_fast.models.layout import is_batched_layout, is_per_expert_layout

NAMES = list_models()
B, C = 3, 7


def _px(name: str) -> int:
    return 32 if name == "resnet32" else 64  # adaptive pooling: 64 px is enough for the ImageNet family


def _pair(name, num_experts=3, use_norm=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    per = create_model(name, num_classes=C, num_experts=num_experts, use_norm=use_norm).to(dtype)
    return per, to_batched(per)


def _images(name, dtype=torch.float64, seed=0, n=B):
    return torch.randn(n, 3, _px(name), _px(name), generator=torch.Generator().manual_seed(seed)).to(dtype)


CASES = [(n, e, u) for n in NAMES for e, u in ((3, True), (1, True), (2, False))]


@pytest.mark.parametrize("name,num_experts,use_norm", CASES, ids=[f"{n}-E{e}-{'cos' if u else 'lin'}" for n, e, u in CASES])
def test_outputs_and_gradients_equal_the_per_expert_network(name, num_experts, use_norm):
    per, bat = _pair(name, num_experts, use_norm)
    assert isinstance(bat, BatchedRIDENet) and isinstance(bat, RIDENet) and bat.batched and not per.batched
    assert sum(p.numel() for p in per.parameters()) == sum(p.numel() for p in bat.parameters())
    x = _images(name)
    out_p, out_b = per(x), bat(x)  # train mode: BatchNorm on batch statistics
    assert isinstance(out_b, RIDEOutput)
    for a, b in zip(out_p, out_b):
        assert a.shape == b.shape and b.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    # any loss touching every output: gradients of every parameter, converted, are equal
    w = torch.randn_like(out_p.expert_logits)
    v = torch.randn_like(out_p.features)
    ((out_p.expert_logits * w).sum() + (out_p.features * v).sum()).backward()
    ((out_b.expert_logits * w).sum() + (out_b.features * v).sum()).backward()
    grads = batched_state_dict({n: p.grad for n, p in per.named_parameters()}, num_experts)
    for n, p in bat.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")
    # BatchNorm running statistics were updated identically
    buffers = batched_state_dict(dict(per.named_buffers()), num_experts)
    for n, t in bat.named_buffers():
        torch.testing.assert_close(t, buffers[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_create_model_batched_same_seed_same_weights_and_model_args(name):
    torch.manual_seed(5)
    per = create_model(name, num_classes=C, num_experts=2)
    torch.manual_seed(5)
    bat = create_model(name, num_classes=C, num_experts=2, batched=True)
    assert bat.model_args == {**per.model_args, "batched": True}
    expected = batched_state_dict(per.state_dict(), 2)
    assert set(expected) == set(bat.state_dict())
    for k, v in bat.state_dict().items():
        assert torch.equal(v, expected[k]), k
    rebuilt = create_model(**bat.model_args)
    assert isinstance(rebuilt, BatchedRIDENet)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in bat.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_conversion_round_trips_exactly(name):
    per, bat = _pair(name, 3, dtype=torch.float32)
    assert is_batched_layout(bat.state_dict()) and is_per_expert_layout(per.state_dict())
    back = to_per_expert(bat)
    assert type(back) is RIDENet and back.model_args == per.model_args
    for (k1, v1), (k2, v2) in zip(per.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    sd = per_expert_state_dict(batched_state_dict(per.state_dict(), 3), 3)
    assert all(torch.equal(sd[k], v) for k, v in per.state_dict().items())
    assert to_batched(bat) is bat and to_per_expert(per) is per


@torch.no_grad()
def test_either_layout_loads_into_either_model():
    per, bat = _pair("resnet32", 2, dtype=torch.float32, seed=1)
    torch.manual_seed(2)
    other_per = create_model("resnet32", num_classes=C, num_experts=2)
    other_bat = create_model("resnet32", num_classes=C, num_experts=2, batched=True)
    other_bat.load_state_dict(per.state_dict())  # per-expert layout -> batched model
    other_per.load_state_dict(bat.state_dict())  # batched layout -> per-expert model
    x = _images("resnet32", torch.float32)
    expected = per.eval()(x).expert_logits
    torch.testing.assert_close(other_bat.eval()(x).expert_logits, expected)
    torch.testing.assert_close(other_per.eval()(x).expert_logits, expected)


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_forward_expert_on_subsets_matches_forward(name):
    _, bat = _pair(name, 3)
    x = _images(name, n=4)
    bat.eval()
    out = bat(x)
    h = bat.forward_trunk(x)
    for i in range(3):
        z, f = bat.forward_expert(i, h[1:3])  # a subset of the images, as in routed inference
        torch.testing.assert_close(z, out.expert_logits[i, 1:3], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f, out.features[i, 1:3], rtol=1e-10, atol=1e-10)
    with pytest.raises(IndexError, match="expert index 3"):
        bat.forward_expert(3, h)


@torch.no_grad()
def test_forward_expert_in_train_mode_updates_only_its_running_stats():
    _, bat = _pair("resnet32", 3)
    x = _images("resnet32", n=4)
    out = bat(x)  # train mode: batch statistics
    before = {n: t.clone() for n, t in bat.named_buffers()}
    z, _ = bat.forward_expert(1, bat.forward_trunk(x))
    torch.testing.assert_close(z, out.expert_logits[1], rtol=1e-10, atol=1e-10)
    bn = bat.experts.layer3[0].bn1
    c = bn.num_features // 3
    assert torch.equal(bn.running_mean[:c], before["experts.layer3.0.bn1.running_mean"][:c])
    assert not torch.equal(bn.running_mean[c : 2 * c], before["experts.layer3.0.bn1.running_mean"][c : 2 * c])
    assert torch.equal(bn.running_mean[2 * c :], before["experts.layer3.0.bn1.running_mean"][2 * c :])


@torch.no_grad()
@pytest.mark.parametrize("name", ["resnet32", "resnext50_32x4d"])
def test_channels_last_matches_contiguous(name):
    _, bat = _pair(name, 3, dtype=torch.float32)
    bat.eval()
    x = _images(name, torch.float32)
    expected = bat(x)
    bat_cl = bat.to(memory_format=torch.channels_last)
    got = bat_cl(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def _original_layout(per_expert: dict, stage_names) -> dict:
    """A per-expert RIDENet state dict renamed to the original code's names (backbone. prefix)."""
    out = {}
    for k, v in per_expert.items():
        m = re.match(r"^experts\.(\d+)\.(\w+)\.(.+)$", k)
        if m:
            out[f"backbone.{m[2]}s.{m[1]}.{m[3]}"] = v
        elif k.startswith("heads."):
            out["backbone.linears." + k[len("heads."):]] = v
        else:
            out["backbone." + k[len("trunk."):]] = v
    return out


@torch.no_grad()
@pytest.mark.parametrize("name", ["resnet32", "resnet10"])
def test_original_weights_load_into_a_batched_model(name):
    torch.manual_seed(3)
    source = create_model(name, num_classes=C, num_experts=3).eval()
    original = _original_layout(source.state_dict(), source.experts[0].stage_names)
    torch.manual_seed(4)
    bat = create_model(name, num_classes=C, num_experts=3, batched=True).eval()
    info = load_original_state_dict(bat, original)
    assert info["loaded"] == len(source.state_dict()) and info["router"] == {}
    x = _images(name, torch.float32)
    torch.testing.assert_close(bat(x).expert_logits, source(x).expert_logits, rtol=1e-5, atol=1e-5)
    wrong = create_model(name, num_classes=C, num_experts=2, batched=True)
    with pytest.raises(CheckpointMismatchError, match="the checkpoint has 3 experts"):
        load_original_state_dict(wrong, original)


def test_state_dict_converters_reject_wrong_expert_counts():
    per, bat = _pair("resnet32", 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expected experts 0\.\.3"):
        batched_state_dict(per.state_dict(), 4)
    with pytest.raises(ValueError, match="does not split into 5 experts"):
        per_expert_state_dict(bat.state_dict(), 5)
    with pytest.raises(ValueError, match="batched must be true or false"):
        create_model("resnet32", batched="yes")


@torch.no_grad()
def test_cosine_heads_compute_in_full_precision_under_autocast():
    per, bat = _pair("resnet32", 2, dtype=torch.float32)
    f = torch.randn(2, 4, per.feature_dim).bfloat16()  # [E, B, D] features as autocast leaves them
    expected = bat.heads(f.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_b = bat.heads(f)
        got_p = torch.stack([per.heads[i](f[i]) for i in range(2)])
        out = bat.eval()(_images("resnet32", torch.float32))
    assert got_b.dtype == got_p.dtype == out.expert_logits.dtype == torch.float32
    torch.testing.assert_close(got_b, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_p, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_input", [False, True])
def test_the_option_a_shortcut_keeps_a_channels_last_input_channels_last(shared_input):
    """Its stride-2 subsample is contiguous in neither format, so the layout is read off the input:
    the residual add then meets two channels-last tensors, and the values are those of NCHW."""
    from ride_fast.models.batched_blocks import ExpertOptionAShortcut

    shortcut = ExpertOptionAShortcut(16, 32, 2, num_experts=3, shared_input=shared_input)
    x = torch.randn(4, 16 if shared_input else 48, 8, 8)
    out = shortcut(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, 96, 4, 4) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, shortcut(x)) and shortcut(x).is_contiguous()
