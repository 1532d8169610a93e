"""Routed vs all-experts inference: does the wall time follow the MACs?

    pytest benchmarks/test_bench_routed.py --benchmark-only     measure (all CPU threads; RIDE_FAST_BENCH_THREADS=n)
    pytest benchmarks/test_bench_routed.py --benchmark-disable  run each case once at batch 16 (CI)

RIDE ResNet-32 with 3 experts, CIFAR-100 sizes (32 px, 100 classes), batch 256 on the CPU and 8192
on a GPU, channels-last, at a fixed usage mix: every other image stops after expert 1, the rest use
all three (the decisions are fixed, so the router is not evaluated; its cost is a negligible
fraction of the network's). Cases:
`all_experts` (the network's own forward) and `routed` (gather / run / index_add). The routed case
also times both paths interleaved (median of paired rounds, so load drift hits both alike) and
records in extra_info: macs_ratio (routed / all experts, from fvcore part by part), time_ratio, and
time_ratio / macs_ratio, which should lie within 15% of 1 (the engine's goal: the routed forward
costs time in proportion to the experts it runs).
"""
import os
import statistics
import time

import pytest
import torch

from ride_fast.models import create_model
from ride_fast.profiling import model_cost
from ride_fast.router import routed_forward

CLASSES, PX, EXPERTS = 100, 32, 3
BATCH = {"cpu": 256, "cuda": 8192}  # a GPU needs a large batch before ResNet-32's small convs stop being launch-bound
CI_BATCH = 16  # with --benchmark-disable: one quick pass through every code path
PAIRED_ROUNDS = 7
TOLERANCE = 0.15

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _setup(device: torch.device, batch: int, count_macs: bool = True):
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=CLASSES, num_experts=EXPERTS).to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, PX, PX, device=device).contiguous(memory_format=torch.channels_last)
    keep = torch.zeros(EXPERTS - 1, batch, dtype=torch.bool, device=device)
    keep[:, ::2] = True  # every other image goes on to all experts, the others stop after expert 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def all_experts():
        out = net(x).logits
        sync()
        return out

    def routed():
        out = routed_forward(net, None, x, decisions=keep)
        sync()
        return out

    if not count_macs:  # fvcore tracing takes seconds; CI runs only need the code paths
        return all_experts, routed, None
    cost = model_cost(net, PX)
    used = [1 if b % 2 else EXPERTS for b in range(batch)]
    macs_ratio = sum(cost.macs_with(n) for n in used) / (batch * cost.total_macs)
    return all_experts, routed, macs_ratio


def _paired_time_ratio(all_experts, routed) -> tuple[float, float, float]:
    """Median over paired rounds of (routed time / all-experts time), and the median times (s)."""
    ratios, t_all, t_routed = [], [], []
    for _ in range(PAIRED_ROUNDS):
        t0 = time.perf_counter()
        all_experts()
        t1 = time.perf_counter()
        routed()
        t2 = time.perf_counter()
        t_all.append(t1 - t0)
        t_routed.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios), statistics.median(t_all), statistics.median(t_routed)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("mode", ["all_experts", "routed"])
def test_routed_inference_time_follows_macs(benchmark, mode, device_name):
    default_threads = 1 if benchmark.disabled else os.cpu_count() or 1  # one pass in CI: no thread contention
    torch.set_num_threads(int(os.environ.get("RIDE_FAST_BENCH_THREADS", default_threads)))
    device = torch.device(device_name)
    batch = CI_BATCH if benchmark.disabled else BATCH[device.type]
    all_experts, routed, macs_ratio = _setup(device, batch, count_macs=not benchmark.disabled)
    fn = routed if mode == "routed" else all_experts
    out = fn()  # warm-up, and a check that the mix is what we meant
    if mode == "routed":
        assert out.num_experts.tolist() == [EXPERTS if b % 2 == 0 else 1 for b in range(batch)]
        tol = 1e-4 if device.type == "cpu" else 5e-2  # cuDNN may pick other (TF32) algorithms per batch size
        torch.testing.assert_close(out.logits[0::2], all_experts()[0::2], rtol=tol, atol=tol)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=str(device), batch=batch, threads=torch.get_num_threads(), torch=torch.__version__,
                                macs_ratio=macs_ratio)
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["ms_per_image"] = 1e3 * benchmark.stats.stats.median / batch
    if mode == "routed" and not benchmark.disabled:
        time_ratio, t_all, t_routed = _paired_time_ratio(all_experts, routed)
        benchmark.extra_info.update(time_ratio=time_ratio, time_over_macs=time_ratio / macs_ratio,
                                    paired_ms_per_image_all=1e3 * t_all / batch, paired_ms_per_image_routed=1e3 * t_routed / batch)
        assert abs(time_ratio / macs_ratio - 1) <= TOLERANCE, (
            f"routed / all-experts time {time_ratio:.3f} vs MACs ratio {macs_ratio:.3f} ({device}, {torch.get_num_threads()} threads)"
        )
