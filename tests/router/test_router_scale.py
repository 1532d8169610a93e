"""The router's top-k inputs divided by the classifier scale (Router(logit_scale=s)): the same
function as the original's on s-scaled logits once the top-k weights are multiplied by s, and
original weights load into it as that same function.

Shape legend: B images, C classes, D feature width, E experts, R = E - 1 routers, k top-k, H hidden.
"""
import pytest
import torch

from ride_fast.router import Router

B, C, D, E, K, H, S = 7, 12, 20, 3, 5, 16, 30.0


def _original_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {f"module.expert_help_pred_hidden_fcs.{i}.{n}": torch.randn(*shape, generator=g)
             for i in range(E - 1) for n, shape in (("weight", (H, D)), ("bias", (H,)))}
    state["module.expert_help_pred_fc.weight"] = torch.randn(1, K + H, generator=g)
    state["module.expert_help_pred_fc.bias"] = torch.randn(1, generator=g)
    return state


def test_scaled_inputs_compute_the_original_function():
    state = _original_state()
    raw = Router.from_original(state, C)  # the original: s-scaled top-k values
    assert raw.logit_scale == 1.0
    scaled = Router(E, D, C, top_k=K, hidden=H, logit_scale=S)
    scaled.load_original_state_dict(state)
    torch.testing.assert_close(scaled.fc.weight[:, :K], raw.fc.weight[:, :K] * S)
    torch.testing.assert_close(scaled.fc.weight[:, K:], raw.fc.weight[:, K:])
    features, logits = torch.randn(E - 1, B, D), S * torch.randn(E - 1, B, C).clamp(-1, 1)
    torch.testing.assert_close(scaled.forward_all(features, logits), raw.forward_all(features, logits), rtol=1e-5, atol=1e-4)
    for step in range(E - 1):
        torch.testing.assert_close(scaled(step, features[step], logits[step]), raw(step, features[step], logits[step]),
                                   rtol=1e-5, atol=1e-4)
    assert Router(**scaled.router_args).logit_scale == S


def test_scaled_inputs_are_unit_sized():
    router = Router(E, D, C, top_k=K, hidden=H, logit_scale=S)
    with torch.no_grad():
        router.fc.weight.zero_()
        router.fc.weight[0, 0] = 1.0  # r = the largest running-mean logit / s
        router.fc.bias.zero_()
    logits = torch.full((B, C), -S)
    logits[:, 3] = S
    torch.testing.assert_close(router(0, torch.randn(B, D), logits), torch.ones(B))
    with pytest.raises(ValueError, match="logit_scale"):
        Router(E, D, C, top_k=K, logit_scale=0.0)
