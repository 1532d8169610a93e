"""The timing phase of the routed report (ride_fast.engine.routed_cost.time_routed): throughput in
A B B A repeats with median and spread, batch-1 latency overall and per number of experts used.

Shape legend: N images, C classes, E experts, R = E - 1 routers.
"""
import dataclasses

import pytest
import torch

from ride_fast.engine import routed_cost
from ride_fast.engine.routed_cost import time_routed
from ride_fast.models import create_model
from ride_fast.router import Router

C, PX, E, N = 6, 8, 3, 12


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("resnet32", num_classes=C, num_experts=E).eval()


def test_abba_order_repeats_and_latency_split_by_experts_used(net, monkeypatch):
    x = torch.randn(N, 3, PX, PX)
    decisions = torch.zeros(E - 1, N, dtype=torch.bool)
    decisions[0, 4:] = True  # images 0-3 stop after expert 1, 4-7 after expert 2, 8-11 use all three
    decisions[1, 8:] = True
    calls = []
    real_forward = routed_cost.routed_forward
    monkeypatch.setattr(routed_cost, "routed_forward", lambda *a, **k: calls.append("B") or real_forward(*a, **k))
    real_net_forward = net.forward
    monkeypatch.setattr(net, "forward", lambda *a, **k: calls.append("A") or real_net_forward(*a, **k))
    timing = time_routed(net, None, x, batch=5, repeats=3, latency_images=N, decisions=decisions)
    chunks = 3  # 12 images in batches of 5
    passes = calls[: (2 + 4 * 3) * chunks]
    order = "".join(passes[::chunks])  # one letter per pass
    assert order == "AB" + "ABBA" * 3  # a warm-up pair, then A B B A per repeat
    assert timing.repeats == 3 and timing.batch == 5 and timing.images == N
    for mode in ("all_experts", "routed"):
        s = timing.images_per_s[mode]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        lat = timing.latency_ms[mode]
        assert 0 < lat["p50"] <= lat["p95"] and lat["images"] == N
    assert timing.time_ratio["min"] <= timing.time_ratio["median"] <= timing.time_ratio["max"]
    assert {k: v["images"] for k, v in timing.latency_by_experts.items()} == {"1": 4, "2": 4, "3": 4}
    assert timing.ms_per_image["routed"] == pytest.approx(1000.0 / timing.images_per_s["routed"]["median"])
    d = timing.as_dict()
    assert d["latency_ratio"] == pytest.approx(timing.latency_ratio) and "batch-1 latency" in timing.summary()


def test_threshold_zero_routes_every_image_through_every_expert(net):
    router = Router(E, net.feature_dim, C, top_k=4, logit_scale=net.scale)
    timing = time_routed(net, router, torch.randn(6, 3, PX, PX), threshold=0.0, batch=4, repeats=1, latency_images=3)
    assert set(timing.latency_by_experts) == {"3"}
    with pytest.raises(ValueError, match="repeats"):
        time_routed(net, router, torch.randn(2, 3, PX, PX), repeats=0)


def test_batch_1_warm_up_runs_every_expert_before_the_first_timed_image(monkeypatch):
    """On a GPU the first batch-1 call of an expert pays for its kernels' selection: the warm-up
    must run each expert at batch 1, even when the images' own routes never reach it (and the
    batched network's all-experts forward runs them as one grouped layer, not one by one)."""
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=C, num_experts=E, batched=True).eval()
    ran = set()
    real = net.forward_expert
    monkeypatch.setattr(net, "forward_expert", lambda i, x: ran.add((i, x.shape[0])) or real(i, x))
    stop_after_one = torch.zeros(E - 1, N, dtype=torch.bool)  # every image uses expert 1 alone
    timing = time_routed(net, None, torch.randn(N, 3, PX, PX), batch=4, repeats=1, latency_images=6, decisions=stop_after_one)
    assert set(timing.latency_by_experts) == {"1"}
    assert {(i, 1) for i in range(E)} <= ran


def test_the_summary_names_threads_only_on_a_cpu(net):
    timing = time_routed(net, None, torch.randn(4, 3, PX, PX), batch=4, repeats=1, latency_images=2,
                         decisions=torch.zeros(E - 1, 4, dtype=torch.bool))
    assert f"time on cpu, {torch.get_num_threads()} threads (" in timing.summary()
    on_gpu = dataclasses.replace(timing, device="cuda:0 (NVIDIA H200)", threads=0)
    assert "time on cuda:0 (NVIDIA H200) (A B B A" in on_gpu.summary() and "threads" not in on_gpu.summary()
