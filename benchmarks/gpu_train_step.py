"""GPU training-step throughput (images/s) for the GPU check: the original code's structure against
ride_fast's fast path, per-expert and batched experts. Synthetic data on the GPU, warm-up first,
torch.cuda.synchronize around the timed region, median of several timed windows.

    python3 benchmarks/gpu_train_step.py OUT.json [--quick]
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from _original_structure import OriginalCifarRIDE, OriginalResNet50RIDE, OriginalRIDELoss, make_original_step  # noqa: E402

from ride_fast.config import LossConfig, OptimConfig  # noqa: E402
from ride_fast.engine.optim import build_optimizer  # noqa: E402
from ride_fast.losses import build_loss  # noqa: E402
from ride_fast.models import create_model  # noqa: E402
from ride_fast.profiling import model_cost  # noqa: E402

H100_BF16_DENSE = 989e12


def counts(c):
    return [max(2, int(500 * 0.01 ** (i / (c - 1)))) for i in range(c)]


def time_steps(step, warmup=3, windows=3, iters=5):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def fast_step(name, experts, classes, batch, px, batched, amp=True, compile_model=False):
    model = create_model(name, num_classes=classes, num_experts=experts, batched=batched).cuda().to(memory_format=torch.channels_last)
    crit = build_loss(LossConfig(name="ride", diversity_factor=-0.2), counts(classes)).cuda()
    crit.set_epoch(10**6)
    opt = build_optimizer(model, OptimConfig(), torch.device("cuda"))
    fwd = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, px, px, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = crit(fwd(x).expert_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def original_step(name, experts, classes, batch, px):
    cls = OriginalCifarRIDE if name == "resnet32" else OriginalResNet50RIDE
    model = cls(classes, experts).cuda()
    crit = OriginalRIDELoss(counts(classes), diversity_factor=-0.2).cuda()
    step = make_original_step(model, crit)
    x = torch.randn(batch, 3, px, px, device="cuda")
    y = torch.randint(0, classes, (batch,), device="cuda")
    return lambda: step(x, y)


def main(out_path, quick=False):
    torch.backends.cudnn.benchmark = True
    cases = [("resnet32", 3, 100, 128, 32), ("resnet50", 3, 1000, 128, 224), ("resnet50", 4, 1000, 128, 224)]
    rows = []
    for name, E, C, B, px in cases:
        macs = model_cost(create_model(name, num_classes=C, num_experts=E), px).total_macs
        train_flops = 6 * macs  # forward 2*MACs, backward about twice the forward
        variants = [("original_fp32", lambda: original_step(name, E, C, B, px))]
        variants += [("ride_fast_bf16_cl", lambda: fast_step(name, E, C, B, px, batched=False)[0])]
        variants += [("ride_fast_bf16_cl_batched", lambda: fast_step(name, E, C, B, px, batched=True)[0])]
        if not quick:
            variants += [("ride_fast_bf16_cl_batched_compile", lambda: fast_step(name, E, C, B, px, batched=True, compile_model=True)[0])]
        base = None
        for label, make in variants:
            try:
                sec = time_steps(make())
            except Exception as err:  # report and go on: one failing variant must not hide the others
                rows.append({"case": f"{name}-E{E}-B{B}-{px}px", "variant": label, "error": f"{type(err).__name__}: {err}"[:300]})
                print(rows[-1], flush=True)
                continue
            ips = B / sec
            base = base or ips
            row = {"case": f"{name}-E{E}-B{B}-{px}px", "variant": label, "ms_per_step": 1e3 * sec, "images_per_s": ips,
                   "speedup_vs_original": ips / base, "train_gflops_per_image": train_flops / 1e9,
                   "mfu_h100_bf16": train_flops * ips / H100_BF16_DENSE}
            rows.append(row)
            print(f"{row['case']:<26} {label:<36} {ips:10.0f} img/s  x{row['speedup_vs_original']:.2f}  MFU {row['mfu_h100_bf16']:.3f}", flush=True)
            torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1], quick="--quick" in sys.argv)
