"""Cost of routed images (docs/method.md §6; ride_fast.engine.routed_cost): MACs per part add up,
the single-expert baseline, and `ride-fast flops` with the routers.

Shape legend: E experts, C classes.
"""
import pytest
import torch

from ride_fast.engine.routed_cost import baseline_macs, routed_cost
from ride_fast.models import create_model
from ride_fast.router import Router

C = 6


def tiny_net(E=3):
    torch.manual_seed(0)
    return create_model("resnet32", num_classes=C, num_experts=E).eval()


def test_routed_cost_parts_add_up():
    net = tiny_net(4)
    router = Router(4, net.feature_dim, C, top_k=5)
    cost = routed_cost(net, router, 32)
    assert cost.router_macs == net.feature_dim * 16 + (5 + 16)  # the two Linear layers
    assert cost.router_params == net.feature_dim * 16 + 16 + (5 + 16 + 1)
    assert cost.routers_params == sum(p.numel() for p in router.parameters())
    for n in range(1, 5):
        parts = cost.network.trunk_macs + sum(cost.network.expert_macs[:n]) + min(n, 3) * cost.router_macs
        assert cost.macs_with(n) == parts
        assert cost.macs_with(n, routers=False) == cost.network.macs_with(n)
    assert cost.as_dict()["macs_with_k_experts_and_routers"][-1] == cost.macs_with(4)


def test_single_expert_baseline_is_the_spec_resnet32():
    net = create_model("resnet32", num_classes=100, num_experts=3)
    assert baseline_macs(net.model_args, 32) / 1e9 == pytest.approx(0.0701, rel=0.01)


def test_flops_cli_prints_the_router_and_totals_with_routers(capsys):
    from ride_fast.cli import main

    assert main(["flops", "model.num_experts=3", "data.name=cifar100_lt"]) == 0
    out = capsys.readouterr().out
    assert "router (each)" in out and "814 MACs" in out and "0.1022" in out and "+ routers" in out
    assert main(["flops", "model.num_experts=3", "data.name=mnist_lt"]) == 0  # top_k 30 > 10 classes: noted, not fatal
    assert "router.top_k=30 exceeds the 10 classes" in capsys.readouterr().out
