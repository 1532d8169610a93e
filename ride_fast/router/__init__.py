"""Stage 2 of RIDE: the router (expert assignment), its targets and loss, routed inference.

Shape legend: B images, E experts, R = E - 1 routers, C classes, D pooled feature width.

    Router(num_experts, feature_dim, num_classes, top_k, hidden=16)
        router(step, feature [B, D], mean_logits [B, C]) -> router logits [B]
        router.forward_all(features [R, B, D], mean_logits [R, B, C]) -> [R, B]
        Router.from_original(state, num_classes): weights of the original code
    router_labels(expert_logits [E, B, C], targets [B]) -> [R, B] bool
    router_loss(router_logits [R, B], labels [R, B], w_on) -> scalar
    router_step(router, expert_logits, features, targets, w_on) -> RouterStep(loss, logits, labels)
    routed_forward(net, router, images, threshold=0.5) -> RoutedOutput(logits [B, C], num_experts [B])

The stage-2 loop (class-balanced sampler of ride_fast.data), checkpoints and the routed report live
in ride_fast.engine.stage2, engine.routed_eval and engine.checkpoint.
"""
from ride_fast.router.inference import RoutedOutput, RoutedRIDE, gather_rows, routed_forward
from ride_fast.router.loss import (
    RouterStep,
    prefix_correct,
    prefix_mean_logits,
    router_labels,
    router_loss,
    router_step,
)
from ride_fast.router.module import Router

__all__ = [
    "RoutedOutput",
    "RoutedRIDE",
    "Router",
    "RouterStep",
    "gather_rows",
    "prefix_correct",
    "prefix_mean_logits",
    "routed_forward",
    "router_labels",
    "router_loss",
    "router_step",
]
