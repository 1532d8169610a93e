"""Cost of a routed RIDE network (docs/method.md §6): MACs per image, counted part by part, and
wall time per image, measured (`time_routed`).

An image that used n experts paid for the trunk, experts 1..n and the min(n, E - 1) routers it went
through. A single trace of the routed model would only count the branch it happened to take, so the
trunk, each expert (branch + classifier) and one router are counted separately with fvcore
(ride_fast.profiling), at batch 1.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ride_fast.models import RIDENet, create_model
from ride_fast.profiling import ModelCost, count_macs, model_cost
from ride_fast.engine.runtime import autocast_context, synchronize
from ride_fast.io import plural
from ride_fast.router import Router, routed_forward


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


# --- time per image ----------------------------------------------------------------------------


def _spread(values) -> dict:
    """{"median", "min", "max"} of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def _percentiles(ms) -> dict:
    v = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "mean": float(v.mean()), "images": int(v.size)}


@dataclass(frozen=True)
class RoutedTiming:
    """Wall time of routed against all-experts inference, measured in a phase of its own.

    Throughput: passes over the same images at the evaluation batch, in the order A B B A per
    repeat (A all experts, B routed) after a warm-up, so drift in the machine's load hits both
    alike; per repeat each mode's time is the mean of its two passes. Latency: batch 1, one image
    at a time, the two modes alternating which goes first; routed inference computes only the
    experts each image needs, so its latency is split by the number of experts used.
    """

    device: str
    threads: int  # CPU threads; 0 on a GPU
    batch: int
    images: int  # images per throughput pass
    repeats: int
    images_per_s: dict  # "all_experts" / "routed" -> {"median", "min", "max"} over the repeats
    time_ratio: dict  # routed / all-experts time per repeat -> {"median", "min", "max"}
    latency_ms: dict  # "all_experts" / "routed" -> {"p50", "p95", "mean", "images"}
    latency_by_experts: dict  # experts used (str) -> {"p50", "p95", "mean", "images"} of routed batch-1 latency

    @property
    def ms_per_image(self) -> dict:
        """Median milliseconds per image at the evaluation batch, per mode."""
        return {mode: 1000.0 / v["median"] for mode, v in self.images_per_s.items()}

    @property
    def latency_ratio(self) -> float:
        """Mean routed batch-1 latency / mean all-experts batch-1 latency."""
        return self.latency_ms["routed"]["mean"] / self.latency_ms["all_experts"]["mean"]

    def as_dict(self) -> dict:
        return {**asdict(self), "ms_per_image": self.ms_per_image, "latency_ratio": self.latency_ratio}

    def summary(self) -> str:
        ips, r, lat = self.images_per_s, self.time_ratio, self.latency_ms
        by = ", ".join(f"{plural(int(n), 'expert')} {v['p50']:.2f}/{v['p95']:.2f} ({v['images']})"
                       for n, v in sorted(self.latency_by_experts.items()))
        return "\n".join([
            f"time on {self.device}{f', {self.threads} threads' if self.threads else ''} "
            f"(A B B A x {self.repeats} after a warm-up, median [min, max]): "
            f"batch {self.batch}: all experts {ips['all_experts']['median']:,.0f} img/s "
            f"[{ips['all_experts']['min']:,.0f}, {ips['all_experts']['max']:,.0f}], routed {ips['routed']['median']:,.0f} img/s "
            f"[{ips['routed']['min']:,.0f}, {ips['routed']['max']:,.0f}]; routed / all-experts time {r['median']:.3f} "
            f"[{r['min']:.3f}, {r['max']:.3f}]",
            f"batch-1 latency p50/p95 ms over {lat['routed']['images']} images: all experts {lat['all_experts']['p50']:.2f}/"
            f"{lat['all_experts']['p95']:.2f}, routed {lat['routed']['p50']:.2f}/{lat['routed']['p95']:.2f} "
            f"(mean ratio {self.latency_ratio:.3f}); routed by experts used: {by}",
        ])


@torch.no_grad()
def time_routed(net: RIDENet, router: Router | None, images: Tensor, *, threshold: float = 0.5, batch: int = 256,
                repeats: int = 5, latency_images: int = 200, amp: str = "none", decisions: Tensor | None = None) -> RoutedTiming:
    """Time routed against all-experts inference on `images` [N, 3, h, w] (on the network's device).

    Throughput over all N images in batches of `batch`, `repeats` A B B A rounds after one A B
    warm-up; batch-1 latency on `latency_images` of them, evenly spread (after a few warm-up images).
    `decisions` [E - 1, N] replaces the router (see routed_forward), e.g. to force a usage mix.
    """
    if repeats < 1 or batch < 1 or images.shape[0] < 1:
        raise ValueError(f"time_routed needs repeats >= 1, batch >= 1 and images; got {repeats}, {batch}, {images.shape[0]} images")
    device = images.device
    net.eval()
    if router is not None:
        router.eval()
    N = images.shape[0]
    chunks = [(s, min(s + batch, N)) for s in range(0, N, batch)]

    def run(mode: str, lo: int, hi: int):
        x = images[lo:hi]
        with autocast_context(device, amp):
            if mode == "all_experts":
                return net(x).logits, None
            d = None if decisions is None else decisions[:, lo:hi]
            out = routed_forward(net, router, x, threshold=threshold, decisions=d)
            return out.logits, out.num_experts

    def one_pass(mode: str) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for lo, hi in chunks:
            run(mode, lo, hi)
        synchronize(device)
        return time.perf_counter() - t0

    one_pass("all_experts"), one_pass("routed")  # warm-up: dispatch, allocator, caches
    seconds = {"all_experts": [], "routed": []}
    for _ in range(repeats):
        a1, b1, b2, a2 = one_pass("all_experts"), one_pass("routed"), one_pass("routed"), one_pass("all_experts")
        seconds["all_experts"].append((a1 + a2) / 2)
        seconds["routed"].append((b1 + b2) / 2)
    ratio = [b / a for a, b in zip(seconds["all_experts"], seconds["routed"])]

    picks = np.unique(np.linspace(0, N - 1, min(latency_images, N)).round().astype(int))  # spread over the images
    every_expert = torch.ones(net.num_experts - 1, 1, dtype=torch.bool, device=device)
    for j in picks[:5]:  # batch-1 warm-up, every expert included (the images' own routes may skip some)
        run("all_experts", j, j + 1), run("routed", j, j + 1)
        with autocast_context(device, amp):
            routed_forward(net, router, images[j:j + 1], threshold=threshold, decisions=every_expert)
    lat = {"all_experts": [], "routed": []}
    used = []
    for n_done, j in enumerate(picks):
        for mode in (("all_experts", "routed") if n_done % 2 == 0 else ("routed", "all_experts")):
            synchronize(device)
            t0 = time.perf_counter()
            _, n = run(mode, j, j + 1)
            synchronize(device)
            lat[mode].append(1000.0 * (time.perf_counter() - t0))
            if n is not None:
                used.append(int(n[0]))
    by = {str(k): _percentiles([ms for ms, u in zip(lat["routed"], used) if u == k]) for k in sorted(set(used))}
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return RoutedTiming(where, threads, batch, N, repeats,
                        {m: _spread([N / s for s in v]) for m, v in seconds.items()}, _spread(ratio),
                        {m: _percentiles(v) for m, v in lat.items()}, by)
