"""Images/s of one full RIDE training step (forward, loss, backward, SGD), data from memory:
the original code's structure against ride_fast with its speed switches turned on one by one.

Shape legend: B images per step, E experts, C classes, px image side.

    pytest benchmarks/test_bench_train_step.py --benchmark-only -k cpu     time on the CPU
    pytest benchmarks/test_bench_train_step.py --benchmark-only -k gpu     time on a CUDA GPU
    pytest benchmarks/test_bench_train_step.py --benchmark-disable         CI: each case once, small

Cases (E, B, px, C): RIDE-ResNet-32 E=3 (128, 32 px, 100 classes: CIFAR-100-LT), RIDE-ResNet-50
E=3 and E=4 (1000 classes: ImageNet-LT; 224 px and B=128 on the GPU, 64 px and B=8 on the CPU so
the suite stays short). With --benchmark-disable every case runs one step at a small batch.

Variants, cumulative (each adds one switch to the one before):

    original        benchmarks/_original_structure.py: experts in a Python loop, loop-per-expert loss
                    with its .item() per expert, PyTorch's default SGD, NCHW, fp32, .item() metrics
    ride_fast       ride_fast's per-expert model and trainer step (`TrainStep`), reference loss
                    (autograd), PyTorch's default SGD, NCHW, fp32; metrics on the device
    fused_loss      loss.impl=auto: fused Triton loss on CUDA, analytic backward on the CPU
    fused_sgd       optim.implementation=auto: fused SGD (one kernel per step; CUDA and CPU)
    channels_last   model.channels_last
    batched         model.batched: all experts as one grouped network
    bf16            train.amp=bf16 (autocast)
    compile         train.compile: torch.compile of forward + loss (the fused Triton loss stays
                    eager: one kernel already); GPU; on the CPU only with
                    RIDE_FAST_BENCH_CPU_COMPILE=1 (minutes of compile time)
    cuda_graphs     train.cuda_graphs: compile mode "reduce-overhead" (GPU only)

extra_info: images_per_s (median round), images_per_s_best (fastest round), speedup_vs_original and
speedup_best (against the original measured in the same pytest run and process), train_flops_per_image
(6 x MACs of ride_fast.profiling.model_cost at the case's px, i.e. 3 x the forward FLOPs; needs
fvcore), and on the GPU mfu = train_flops_per_image x images_per_s / peak_flops (peak_flops =
989e12, H100 SXM bf16 dense). On the GPU a round is GPU_STEPS steps closed by
torch.cuda.synchronize, after one warm-up round (cuDNN autotuning, compilation).
Environment: RIDE_FAST_BENCH_THREADS (CPU threads, default all cores), RIDE_FAST_BENCH_GPU_BATCH
(B of the ResNet-50 cases on the GPU, default 128), RIDE_FAST_BENCH_GPU_STEPS (steps per GPU round,
default 10), RIDE_FAST_BENCH_ROUNDS (timed rounds, default 3 on the GPU and 5 on the CPU).
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
import torch
from _original_structure import ORIGINAL_MODELS, OriginalRIDELoss, make_original_step

from ride_fast.config import LossConfig, OptimConfig
from ride_fast.engine.trainer import TrainStep, build_optimizer
from ride_fast.losses import build_loss
from ride_fast.models import create_model

H100_BF16_DENSE = 989e12
GPU_STEPS = int(os.environ.get("RIDE_FAST_BENCH_GPU_STEPS", "10"))  # steps per timed round on the GPU
ROUNDS = int(os.environ.get("RIDE_FAST_BENCH_ROUNDS", "0"))  # timed rounds; 0: 3 on the GPU, 5 on the CPU
GPU_R50_BATCH = int(os.environ.get("RIDE_FAST_BENCH_GPU_BATCH", "128"))

# name -> (model, E, C, diversity_factor, reweight_factor, reweight_epoch, {device: (B, px)}, CI (B, px))
CASES = {
    "r32_e3": ("resnet32", 3, 100, -0.45, 0.05, 160, {"cpu": (128, 32), "gpu": (128, 32)}, (16, 32)),
    "r50_e3": ("resnet50", 3, 1000, -0.2, 0.02, 80, {"cpu": (8, 64), "gpu": (GPU_R50_BATCH, 224)}, (2, 64)),
    "r50_e4": ("resnet50", 4, 1000, -0.2, 0.02, 80, {"cpu": (8, 64), "gpu": (GPU_R50_BATCH, 224)}, (2, 64)),
}

# Cumulative switches; "original" is the baseline and not a TrainStep.
BASE = dict(loss_impl="reference", sgd="default", channels_last=False, batched=False, amp="none", compile=False, cuda_graphs=False)
STEPS = [
    ("ride_fast", {}),
    ("fused_loss", dict(loss_impl="auto")),
    ("fused_sgd", dict(sgd="auto")),
    ("channels_last", dict(channels_last=True)),
    ("batched", dict(batched=True)),
    ("bf16", dict(amp="bf16")),
    ("compile", dict(compile=True)),
    ("cuda_graphs", dict(cuda_graphs=True)),
]
VARIANTS = ["original"] + [name for name, _ in STEPS]


def switches(variant: str) -> dict:
    """The ride_fast settings of a variant: BASE plus every step up to and including it."""
    out = dict(BASE)
    for name, change in STEPS:
        out.update(change)
        if name == variant:
            return out
    raise KeyError(variant)


def class_counts(C: int) -> list[int]:
    """A long-tailed profile: CIFAR-100-LT (500 -> 5) for 100 classes, ImageNet-LT-like (1280 -> 5) otherwise."""
    top = 500 if C <= 100 else 1280
    return [max(2, int(top * (5 / top) ** (i / (C - 1)))) for i in range(C)]


_ORIGINAL_IPS: dict[tuple[str, str, int], tuple[float, float]] = {}  # (device, case, B) -> (median, best) images/s
_FLOPS: dict[tuple[str, int], float | None] = {}


def train_flops_per_image(case: str, px: int) -> float | None:
    """6 x MACs per image (forward 2 x MACs, backward about twice that); None without fvcore."""
    if (case, px) not in _FLOPS:
        name, E, C = CASES[case][:3]
        try:
            from ride_fast.profiling import model_cost

            _FLOPS[case, px] = 6.0 * model_cost(create_model(name, num_classes=C, num_experts=E), px).total_macs
        except ImportError:
            _FLOPS[case, px] = None
    return _FLOPS[case, px]


def make_original(case: str, device: torch.device, B: int, px: int):
    name, E, C, lam, gamma = CASES[case][:5]
    torch.manual_seed(0)
    model = ORIGINAL_MODELS[name](C, E).to(device)
    criterion = OriginalRIDELoss(class_counts(C), diversity_factor=lam, reweight_factor=gamma).to(device)
    step = make_original_step(model, criterion, weight_decay=5e-4 if name == "resnet32" else 2e-4)
    images = torch.randn(B, 3, px, px, device=device)
    labels = torch.randint(0, C, (B,), device=device)
    return lambda: step(images, labels)


def make_ride_fast(case: str, variant: str, device: torch.device, B: int, px: int):
    name, E, C, lam, gamma, reweight_epoch = CASES[case][:6]
    s = switches(variant)
    torch.manual_seed(0)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    model = create_model(name, num_classes=C, num_experts=E, batched=s["batched"]).to(device, memory_format=fmt)
    loss_cfg = LossConfig(diversity_factor=lam, reweight_factor=gamma, reweight_epoch=reweight_epoch, impl=s["loss_impl"])
    criterion = build_loss(loss_cfg, np.asarray(class_counts(C))).to(device)
    criterion.set_epoch(reweight_epoch + 1)  # the DRW phase: every term of the loss is active
    wd = 5e-4 if name == "resnet32" else 2e-4
    if s["sgd"] == "default":  # what the original gets: PyTorch's choice (for-loop on the CPU, foreach on CUDA)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=wd, nesterov=True)
    else:
        optimizer = build_optimizer(model, OptimConfig(weight_decay=wd, implementation=s["sgd"]), device)
    step = TrainStep(model, criterion, optimizer, device=device, amp=s["amp"], compile=s["compile"], cuda_graphs=s["cuda_graphs"])
    model.train()
    images = torch.randn(B, 3, px, px, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, C, (B,), device=device)
    return lambda: step(images, labels)


def runner(step, device: torch.device):
    """One timed round: 1 step on the CPU; GPU_STEPS steps and a synchronize on the GPU."""
    if device.type != "cuda":
        return step

    def run():
        for _ in range(GPU_STEPS):
            step()
        torch.cuda.synchronize(device)

    return run


def time_rounds(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def skip_reason(variant: str, device: torch.device, timing: bool) -> str | None:
    if variant == "cuda_graphs" and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if variant == "compile" and device.type != "cuda" and not (timing and os.environ.get("RIDE_FAST_BENCH_CPU_COMPILE")):
        return "torch.compile on the CPU takes minutes: set RIDE_FAST_BENCH_CPU_COMPILE=1 and time with --benchmark-only"
    return None


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("where", DEVICES)
def test_train_step(benchmark, where, case, variant):
    device = torch.device("cuda" if where == "gpu" else "cpu")
    timing = not benchmark.disabled
    reason = skip_reason(variant, device, timing)
    if reason:
        pytest.skip(reason)
    if variant in ("compile", "cuda_graphs"):
        torch._dynamo.reset()  # every case compiles its own TrainStep: start from an empty cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.backends.cudnn.benchmark = True  # the original's run gets it too (a conservative baseline)
    else:
        torch.set_num_threads(int(os.environ.get("RIDE_FAST_BENCH_THREADS", os.cpu_count() or 1)))
    B, px = CASES[case][6][where] if timing else CASES[case][7]
    rounds = ROUNDS or (3 if device.type == "cuda" else 5)  # of GPU_STEPS steps on the GPU, of one step on the CPU
    warmup = 1
    steps_per_round = GPU_STEPS if device.type == "cuda" else 1

    key = (where, case, B)
    if variant == "original":
        fn = runner(make_original(case, device, B, px), device)
    else:
        if timing and key not in _ORIGINAL_IPS:  # the baseline was not run in this pytest run (-k): time it here
            base = runner(make_original(case, device, B, px), device)
            time_rounds(base, warmup)
            t = time_rounds(base, rounds)
            _ORIGINAL_IPS[key] = (B * steps_per_round / float(np.median(t)), B * steps_per_round / min(t))
        fn = runner(make_ride_fast(case, variant, device, B, px), device)

    if timing:
        time_rounds(fn, warmup)  # allocator, cuDNN autotuning, torch.compile
    result = benchmark.pedantic(fn, rounds=rounds if timing else 1, iterations=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if result is not None:  # the loss of the last CPU step
        assert np.isfinite(float(result)), f"{case} {variant}: the loss is {float(result)}"

    info = dict(case=case, variant=variant, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                batch=B, px=px, torch=torch.__version__, switches={} if variant == "original" else switches(variant))
    if device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    if timing and benchmark.stats is not None:
        stats = benchmark.stats.stats
        ips, best = B * steps_per_round / stats.median, B * steps_per_round / stats.min
        if variant == "original":
            _ORIGINAL_IPS[key] = (ips, best)
        base, base_best = _ORIGINAL_IPS[key]
        info.update(images_per_s=ips, images_per_s_best=best, speedup_vs_original=ips / base, speedup_best=best / base_best)
        flops = train_flops_per_image(case, px)
        info["train_flops_per_image"] = flops
        if device.type == "cuda" and flops:
            info.update(peak_flops=H100_BF16_DENSE, mfu=flops * ips / H100_BF16_DENSE)
    benchmark.extra_info.update(info)


@torch.no_grad()
@pytest.mark.parametrize("case", ["r32_e3", "r50_e3"])
def test_original_structure_computes_what_ride_fast_computes(case):
    """The baseline is the same network and loss: its weights load into ride_fast (original names)
    with equal logits, and its loop-per-expert loss equals ride_fast's RIDE loss (DRW phase)."""
    name, E, C, lam, gamma, reweight_epoch = CASES[case][:6]
    torch.manual_seed(0)
    original = ORIGINAL_MODELS[name](C, E).eval()
    from ride_fast.models import load_original_state_dict

    model = create_model(name, num_classes=C, num_experts=E, batched=True).eval()
    load_original_state_dict(model, original.state_dict())
    x = torch.randn(2, 3, 32 if name == "resnet32" else 64, 32 if name == "resnet32" else 64)
    y = torch.randint(0, C, (2,))
    ref = original(x)
    out = model(x)
    torch.testing.assert_close(out.expert_logits, ref["logits"].transpose(0, 1), rtol=1e-4, atol=1e-4)
    crit = build_loss(LossConfig(diversity_factor=lam, reweight_factor=gamma, reweight_epoch=reweight_epoch, impl="reference"),
                      np.asarray(class_counts(C)))
    crit.set_epoch(reweight_epoch + 1)
    loss = OriginalRIDELoss(class_counts(C), diversity_factor=lam, reweight_factor=gamma)(ref["output"], y, {"logits": ref["logits"].transpose(0, 1)})
    torch.testing.assert_close(crit(out.expert_logits, y), loss, rtol=1e-4, atol=1e-4)
