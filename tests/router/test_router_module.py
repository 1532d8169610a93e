"""The router module: its computation (docs/method.md §5), the batched training form, and weights of
the original code (expert_help_pred_hidden_fcs.{i}, expert_help_pred_fc / _fcs.{i}).

Shape legend: B images, E experts, R = E - 1 routers, C classes, D feature width, k top-k, H hidden.
"""
import pytest
import torch
import torch.nn.functional as F

from ride_fast.router import Router

B, C, D, K, H = 6, 12, 20, 5, 16


def original_router_state(E: int, shared: bool = True, prefix: str = "module.backbone.") -> dict:
    """Router weights named as the original RIDE checkpoint names them."""
    g = torch.Generator().manual_seed(E)
    state = {}
    for i in range(E - 1):
        state[f"{prefix}expert_help_pred_hidden_fcs.{i}.weight"] = torch.randn(H, D, generator=g)
        state[f"{prefix}expert_help_pred_hidden_fcs.{i}.bias"] = torch.randn(H, generator=g)
    fcs = ["expert_help_pred_fc"] if shared else [f"expert_help_pred_fcs.{i}" for i in range(E - 1)]
    for name in fcs:
        state[f"{prefix}{name}.weight"] = torch.randn(1, K + H, generator=g)
        state[f"{prefix}{name}.bias"] = torch.randn(1, generator=g)
    return state


def original_pred_expert_help(state: dict, i: int, feature, logits, shared=True, prefix="module.backbone."):
    """Transcription of the original `pred_expert_help` (feature already pooled)."""
    feature = feature / feature.norm(dim=1, keepdim=True)
    w, b = state[f"{prefix}expert_help_pred_hidden_fcs.{i}.weight"], state[f"{prefix}expert_help_pred_hidden_fcs.{i}.bias"]
    feature = F.relu(F.linear(feature, w, b))
    topk, _ = torch.topk(logits, k=K, dim=1)
    x = torch.cat((topk, feature), dim=1)
    name = "expert_help_pred_fc" if shared else f"expert_help_pred_fcs.{i}"
    return F.linear(x, state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("E", [2, 4])
def test_original_weights_load_and_give_the_original_router_logits(E, shared):
    state = original_router_state(E, shared)
    router = Router.from_original(state, num_classes=C)
    assert (router.num_experts, router.feature_dim, router.top_k, router.hidden_dim, router.share_fc) == (E, D, K, H, shared)
    torch.manual_seed(1)
    for i in range(E - 1):
        feature, logits = torch.rand(B, D), torch.randn(B, C) * 10
        expected = original_pred_expert_help(state, i, feature, logits, shared).view(-1)
        torch.testing.assert_close(router(i, feature, logits), expected)


def test_converted_router_entry_without_prefixes_loads_into_a_built_router():
    state = original_router_state(3, prefix="")  # what `ride-fast convert` stores under "router"
    router = Router(3, D, C, top_k=K, hidden=H)
    router.load_original_state_dict(state)
    torch.testing.assert_close(router.hidden[1].weight, state["expert_help_pred_hidden_fcs.1.weight"])
    torch.testing.assert_close(router.fc.bias, state["expert_help_pred_fc.bias"])


def test_original_weights_that_do_not_fit_are_named():
    state = original_router_state(3, prefix="")
    with pytest.raises(ValueError, match=rf"missing expert_help_pred_hidden_fcs\.2\.bias \[{H}\], expert_help_pred_hidden_fcs\.2\.weight \[{H}, {D}\]"):
        Router(4, D, C, top_k=K, hidden=H).load_original_state_dict(state)
    with pytest.raises(ValueError, match=rf"shape mismatches expert_help_pred_fc\.weight: checkpoint \[1, {K + H}\] vs router \[1, {K + 1 + H}\]"):
        Router(3, D, C, top_k=K + 1, hidden=H).load_original_state_dict(state)
    with pytest.raises(KeyError, match="linears.0.weight"):
        Router.original_to_ride_fast({"linears.0.weight": torch.zeros(1)})


def test_original_weights_are_checked_against_the_network_s_experts_and_feature_width():
    """With the network's E and D given, weights for another E or D are refused by their original names."""
    state = original_router_state(3, prefix="backbone.")
    assert Router.from_original(state, C, num_experts=3, feature_dim=D).router_args == Router(3, D, C, top_k=K, hidden=H).router_args
    with pytest.raises(ValueError, match=rf"shape mismatches backbone\.expert_help_pred_hidden_fcs\.0\.weight: checkpoint \[{H}, {D}\] "
                                         rf"vs router \[{H}, {D + 4}\], backbone\.expert_help_pred_hidden_fcs\.1\.weight"):
        Router.from_original(state, C, num_experts=3, feature_dim=D + 4)
    with pytest.raises(ValueError, match=r"unexpected backbone\.expert_help_pred_hidden_fcs\.1\.bias"):
        Router.from_original(state, C, num_experts=2, feature_dim=D)
    del state["backbone.expert_help_pred_fc.bias"]
    with pytest.raises(ValueError, match=r"missing expert_help_pred_fc\.bias \[1\]"):
        Router.from_original(state, C, num_experts=3, feature_dim=D)
    state = original_router_state(3, prefix="")
    state["expert_help_pred_fc.weight"] = torch.zeros(1, H)  # no room for the top-k logits
    with pytest.raises(ValueError, match=rf"expert_help_pred_fc\.weight has shape \[1, {H}\]; expected \[1, k \+ H\] with H = {H}"):
        Router.from_original(state, C)


@pytest.mark.parametrize("shared", [True, False])
def test_forward_all_equals_each_router_on_its_own(shared):
    torch.manual_seed(0)
    E = 4
    router = Router(E, D, C, top_k=K, hidden=H, share_fc=shared)
    features, means = torch.randn(E - 1, B, D), torch.randn(E - 1, B, C)
    batched = router.forward_all(features, means)
    assert batched.shape == (E - 1, B)
    for i in range(E - 1):
        torch.testing.assert_close(batched[i], router(i, features[i], means[i]))


@pytest.mark.parametrize("shared", [True, False])
def test_the_routers_decide_in_float32_under_bf16_autocast(shared):
    """Routed inference runs the network under autocast; calibration replays the routers in
    float32. Both must see the same router logits, bit for bit, from the same bf16 inputs."""
    torch.manual_seed(0)
    E = 3
    router = Router(E, D, C, top_k=K, hidden=H, share_fc=shared)
    features, means = torch.randn(E - 1, 64, D).bfloat16(), (torch.randn(E - 1, 64, C) * 30).bfloat16()
    expected_all = router.forward_all(features.float(), means.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_all = router.forward_all(features, means)
        got = [router(i, features[i], means[i]) for i in range(E - 1)]
    assert got_all.dtype == torch.float32
    torch.testing.assert_close(got_all, expected_all, rtol=0, atol=0)
    for i in range(E - 1):
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i], router(i, features[i].float(), means[i].float()), rtol=0, atol=0)


def test_the_computation_follows_the_spec():
    torch.manual_seed(0)
    router = Router(3, D, C, top_k=K, hidden=H)
    feature, logits = torch.randn(B, D), torch.randn(B, C)
    h = torch.relu(router.hidden[1](feature / feature.norm(dim=1, keepdim=True)))
    v = logits.sort(dim=1, descending=True).values[:, :K]  # top-k first, sorted descending
    expected = torch.cat([v, h], 1) @ router.fc.weight[0] + router.fc.bias
    torch.testing.assert_close(router(1, feature, logits), expected)


def test_parameter_counts_and_args_round_trip():
    router = Router(3, 48, 100, top_k=30)
    assert sum(p.numel() for p in router.parameters()) == 2 * (48 * 16 + 16) + (30 + 16 + 1)
    assert Router(**router.router_args).router_args == router.router_args


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"router\.top_k=30 must lie in 1\.\.10"):
        Router(3, D, 10, top_k=30)
    with pytest.raises(ValueError, match="at least 2 experts"):
        Router(1, D, C, top_k=K)
    with pytest.raises(IndexError, match="router step 2 out of range"):
        Router(3, D, C, top_k=K)(2, torch.randn(B, D), torch.randn(B, C))
    with pytest.raises(ValueError, match=r"forward_all expects features \[R=2"):
        Router(3, D, C, top_k=K).forward_all(torch.randn(3, B, D), torch.randn(3, B, C))
