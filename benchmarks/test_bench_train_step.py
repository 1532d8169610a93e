"""Images/s of one full RIDE training step (forward, loss, backward, SGD) from data in memory.

    pytest benchmarks/test_bench_train_step.py --benchmark-only     measure (2 threads on the CPU)
    pytest benchmarks/test_bench_train_step.py --benchmark-disable  run each case once (CI)

Cases: RIDE ResNet-32 with 3 experts at batch 128, 32 px, 100 classes (the CIFAR-100-LT recipe),
and the single-expert ResNet-32 baseline for scale. `extra_info["images_per_s"]` is the number to
record in BENCHMARKS.md.
"""
import os

import numpy as np
import pytest
import torch

from ride_fast.config import LossConfig, OptimConfig
from ride_fast.engine.trainer import build_optimizer, resolve_device
from ride_fast.losses import build_loss
from ride_fast.models import create_model

BATCH = 128
CLASSES = 100
COUNTS = [int(500 * 0.01 ** (i / 99)) for i in range(CLASSES)]  # CIFAR-100-LT profile


def make_step(num_experts: int, reduce: bool, cosine: bool, loss_name: str, device):
    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=CLASSES, num_experts=num_experts, reduce_dimension=reduce, use_norm=cosine).to(device)
    criterion = build_loss(LossConfig(name=loss_name), np.asarray(COUNTS)).to(device)
    criterion.set_epoch(161)  # the DRW phase: the whole loss is active
    optimizer = build_optimizer(model, OptimConfig(), device)
    images = torch.randn(BATCH, 3, 32, 32, device=device)
    labels = torch.randint(0, CLASSES, (BATCH,), device=device)

    def step():
        loss = criterion(model(images).expert_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    return step


@pytest.mark.parametrize(
    "name, experts, reduce, cosine, loss",
    [("ride_r32_e3", 3, True, True, "ride"), ("ce_r32_baseline", 1, False, False, "ce")],
)
def test_train_step_images_per_s(benchmark, name, experts, reduce, cosine, loss):
    torch.set_num_threads(int(os.environ.get("RIDE_FAST_BENCH_THREADS", os.cpu_count() or 1)))
    device = resolve_device("auto")
    step = make_step(experts, reduce, cosine, loss, device)
    step()  # warm-up (allocator, first-call dispatch)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None and benchmark.stats.stats.mean:
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info.update(device=str(device), batch=BATCH, threads=torch.get_num_threads(), torch=torch.__version__)
    assert torch.isfinite(step())
