"""Cost of a routed RIDE network (docs/method.md §6): MACs per image, counted part by part.

An image that used n experts paid for the trunk, experts 1..n and the min(n, E - 1) routers it went
through. A single trace of the routed model would only count the branch it happened to take, so the
trunk, each expert (branch + classifier) and one router are counted separately with fvcore
(ride_fast.profiling), at batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ride_fast.models import RIDENet, create_model
from ride_fast.profiling import ModelCost, count_macs, model_cost
from ride_fast.router import Router


class _RouterStep(nn.Module):
    def __init__(self, router: Router, step: int) -> None:
        super().__init__()
        self.router, self.step = router, step

    def forward(self, feature: Tensor, mean_logits: Tensor) -> Tensor:
        return self.router(self.step, feature, mean_logits)


@dataclass(frozen=True)
class RoutedCost:
    """MACs per image of a routed RIDE network, by part (fvcore, batch 1)."""

    network: ModelCost
    router_macs: int  # one router (all routers are the same size)
    router_params: int  # one router: its hidden layer + the shared final layer
    routers_params: int  # all routers together

    @property
    def num_experts(self) -> int:
        return len(self.network.expert_macs)

    def macs_with(self, n: int, routers: bool = True) -> int:
        """An image that used n experts: trunk + experts 1..n (+ the min(n, E - 1) routers it went through)."""
        return self.network.macs_with(n) + (min(n, self.num_experts - 1) * self.router_macs if routers else 0)

    def as_dict(self) -> dict:
        E = self.num_experts
        return {
            **self.network.as_dict(),
            "router_macs": self.router_macs,
            "router_params": self.router_params,
            "routers_params": self.routers_params,
            "macs_with_k_experts_and_routers": [self.macs_with(k) for k in range(1, E + 1)],
        }


@torch.no_grad()
def count_router_macs(router: Router) -> int:
    """MACs of one router on one image (fvcore; every router has the same size)."""
    device = next(router.parameters()).device
    was_training = router.training
    router.eval()
    try:
        feature = torch.ones(1, router.feature_dim, device=device)
        mean_logits = torch.zeros(1, router.num_classes, device=device)
        return count_macs(_RouterStep(router, 0), feature, mean_logits)
    finally:
        router.train(was_training)


def router_params(router: Router) -> tuple[int, int]:
    """(parameters of one router: its hidden layer + the final layer, parameters of all routers)."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    final = n(router.fc) if router.share_fc else n(router.fcs[0])
    return n(router.hidden[0]) + final, n(router)


def routed_cost(net: RIDENet, router: Router, image_size: int, in_channels: int = 3) -> RoutedCost:
    """Count trunk, each expert (branch + classifier) and one router separately with fvcore:
    a single trace of the routed model would only count the branch it happened to take."""
    one, every = router_params(router)
    return RoutedCost(model_cost(net, image_size, in_channels), count_router_macs(router), one, every)


def baseline_macs(model_args: dict, image_size: int, in_channels: int = 3) -> int:
    """MACs per image of the single-expert baseline of the same backbone: 1 expert,
    reduce_dimension=False, Linear head (ResNet-32: 0.0701 G; ResNet-50: 4.134 G)."""
    base = create_model(model_args["name"], num_classes=model_args["num_classes"], num_experts=1, reduce_dimension=False, use_norm=False)
    return model_cost(base, image_size, in_channels).total_macs
