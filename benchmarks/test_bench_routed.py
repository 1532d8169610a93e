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

import pytest
import torch
from _paired import time_paired, use_bench_threads

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
    """Median over A B B A pairs of (routed time / all-experts time), and the median times (s)."""
    paired = time_paired(all_experts, routed, PAIRED_ROUNDS, warmup=0)
    return statistics.median(paired.time_ratios), statistics.median(paired.a), statistics.median(paired.b)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("mode", ["all_experts", "routed"])
def test_routed_inference_time_follows_macs(benchmark, mode, device_name):
    use_bench_threads(not benchmark.disabled)
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


FLOP_TOLERANCE = 0.01


def test_routed_forward_executes_the_macs_it_is_charged():
    """FLOPs the routed forward really executes (torch's FlopCounterMode: convolutions and matmuls)
    over those of all experts equal the MACs ratio that fvcore charges part by part, within 1%
    (BatchNorm, which fvcore charges and FlopCounterMode does not, is a small and equal share of
    each part). Computing every expert for every image would give 1."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    all_experts, routed, macs_ratio = _setup(torch.device("cpu"), CI_BATCH)
    with FlopCounterMode(display=False) as dense:
        all_experts()
    with FlopCounterMode(display=False) as sparse:
        routed()
    flops_ratio = sparse.get_total_flops() / dense.get_total_flops()
    assert abs(flops_ratio / macs_ratio - 1) <= FLOP_TOLERANCE, f"executed FLOPs ratio {flops_ratio:.4f}, MACs ratio {macs_ratio:.4f}"


# --- time_routed: the timing phase of the routed report ------------------------------------------------

TIME_TOLERANCE_ALL = 0.10  # threshold 0: routed time within 10% of all experts (+ the routers, 0.001% of the MACs)
DEMO_ROUTED = os.environ.get("RIDE_FAST_DEMO_ROUTED", "demo_out/ride_3experts/routed.pt")


def test_threshold_zero_routed_time_matches_all_experts(benchmark):
    """Every image through every expert and router: routed inference must cost what all experts cost."""
    from ride_fast.engine.routed_cost import time_routed
    from ride_fast.router import Router

    use_bench_threads(not benchmark.disabled)
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=CLASSES, num_experts=EXPERTS).to(memory_format=torch.channels_last).eval()
    router = Router(EXPERTS, net.feature_dim, CLASSES, top_k=30, logit_scale=net.scale).eval()
    n = CI_BATCH if benchmark.disabled else BATCH["cpu"]
    x = torch.randn(n, 3, PX, PX).contiguous(memory_format=torch.channels_last)
    kwargs = dict(threshold=0.0, batch=min(n, BATCH["cpu"]), repeats=1 if benchmark.disabled else 5,
                  latency_images=4 if benchmark.disabled else 100)
    timing = benchmark.pedantic(lambda: time_routed(net, router, x, **kwargs), rounds=1, iterations=1)
    assert set(timing.latency_by_experts) == {str(EXPERTS)}  # threshold 0: every image used every expert
    benchmark.extra_info.update(timing.as_dict(), torch=torch.__version__)
    if not benchmark.disabled:
        ratio = timing.time_ratio["median"]
        assert abs(ratio - 1) <= TIME_TOLERANCE_ALL, f"threshold 0: routed / all-experts time {ratio:.3f} ({timing.summary()})"


@pytest.mark.timing
def test_demo_batch1_time_ratio_tracks_macs_ratio(benchmark):
    """The demo's routed model at its chosen threshold: batch-1 time ratio within 15% of the MACs ratio.
    Needs the demo's routed.pt (`make demo`; RIDE_FAST_DEMO_ROUTED=path to use another)."""
    if not os.path.isfile(DEMO_ROUTED):
        pytest.fail(f"no routed demo checkpoint at {DEMO_ROUTED}: run `make demo` first, or set RIDE_FAST_DEMO_ROUTED=path", pytrace=False)
    from ride_fast.data import InMemoryLoader, build_datasets
    from ride_fast.engine.checkpoint import checkpoint_config, load_checkpoint, load_routed_checkpoint
    from ride_fast.engine.routed_cost import routed_cost, time_routed

    use_bench_threads(not benchmark.disabled)
    cfg = checkpoint_config(load_checkpoint(DEMO_ROUTED))
    net, router, _ = load_routed_checkpoint(DEMO_ROUTED, "cpu")
    test_set = build_datasets(cfg.data)[1]
    x = torch.cat([b.images for b in InMemoryLoader(test_set, cfg.data.eval_batch_size, train=False)])
    t = cfg.router.threshold
    timing = benchmark.pedantic(lambda: time_routed(net, router, x[::4], threshold=t, batch=cfg.data.eval_batch_size,
                                                    latency_images=200), rounds=1, iterations=1)
    cost = routed_cost(net, router, cfg.data.image_size)
    used = {int(k): v["images"] for k, v in timing.latency_by_experts.items()}
    macs_ratio = sum(n * cost.macs_with(k) for k, n in used.items()) / (sum(used.values()) * cost.macs_with(net.num_experts))
    ratio = timing.latency_ratio
    benchmark.extra_info.update(timing.as_dict(), threshold=t, macs_ratio=macs_ratio, time_over_macs=ratio / macs_ratio)
    assert abs(ratio / macs_ratio - 1) <= TOLERANCE, f"batch-1 time ratio {ratio:.3f} vs MACs ratio {macs_ratio:.3f} ({timing.summary()})"
