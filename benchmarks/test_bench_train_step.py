"""Images/s of one full RIDE training step (forward, loss, backward, SGD), data from memory:
the original code's structure against ride_fast with its speed switches turned on one by one.

Shape legend: B images per step, E experts, C classes, px image side.

    pytest benchmarks/test_bench_train_step.py --benchmark-only -k cpu     time on the CPU
    pytest benchmarks/test_bench_train_step.py --benchmark-only -k gpu     time on a CUDA GPU
    pytest benchmarks/test_bench_train_step.py --benchmark-disable         CI: each case once, small

Cases (E, B, px, C): RIDE-ResNet-32 E=3 (128, 32 px, 100 classes: CIFAR-100-LT), RIDE-ResNet-50
E=3 and E=4 (1000 classes: ImageNet-LT; 224 px and B=128 on the GPU, 64 px and B=8 on the CPU so
the suite stays short).

With --benchmark-disable (CI) every case runs one step at a small batch (ResNet-50 at 32 px, its
smallest input: the stride-32 network ends on one pixel) from the same weights (the original code's,
seed 0, loaded into ride_fast) and the same batch, and checks it: the loss and the weights after the
step equal the original structure's (`TOLERANCES`, per precision), and each switch took effect
(`check_switches`: the fused loss's backward in the graph, fused SGD, channels-last weights and
convolution outputs, one grouped convolution per layer for all experts, the C 3x3 kernel for every
convolution it fits in float32 channels-last on the CPU, bf16 features). When
timing (--benchmark-only) the last variant of each device must beat the original (`speedup_best`).

Variants, cumulative (each adds one switch to the one before):

    original        benchmarks/_original_structure.py: experts in a Python loop, loop-per-expert loss
                    with its .item() per expert, PyTorch's default SGD, NCHW, fp32, .item() metrics
    ride_fast       ride_fast's per-expert model and trainer step (`TrainStep`), reference loss
                    (autograd), PyTorch's default SGD, NCHW, fp32; metrics on the device
    fused_loss      loss.impl=auto: fused Triton loss on CUDA, analytic backward on the CPU
    fused_sgd       optim.implementation=auto: fused SGD (one kernel per step; CUDA and CPU)
    channels_last   model.channels_last (on the CPU it also lets the C BatchNorm + ReLU and 3x3 convolution kernels run)
    batched         model.batched: all experts as one grouped network
    bf16            train.amp=bf16 (autocast)
    compile         train.compile: torch.compile of forward + loss (the fused Triton loss stays
                    eager: one kernel already); GPU; on the CPU only with
                    RIDE_FAST_BENCH_CPU_COMPILE=1 (minutes of compile time; not collected otherwise)
    cuda_graphs     train.cuda_graphs: the whole step (forward to SGD update) replayed as one CUDA graph (GPU only)

extra_info: images_per_s (median round), images_per_s_best (fastest round), speedup_vs_original and
speedup_best (against the original measured in the same pytest run and process), train_flops_per_image
(6 x MACs of ride_fast.profiling.model_cost at the case's px, i.e. 3 x the forward FLOPs; needs
fvcore), and on the GPU mfu = train_flops_per_image x images_per_s / peak_flops (the bf16 dense
peak of the device: 989e12 for H100 / H200 SXM, _results.bf16_dense_tflops). On the GPU a round is GPU_STEPS steps closed by
torch.cuda.synchronize, after one warm-up round (cuDNN autotuning, compilation).
Environment: RIDE_FAST_BENCH_THREADS (CPU threads, default all cores when timing, 1 in CI), RIDE_FAST_BENCH_GPU_BATCH
(B of the ResNet-50 cases on the GPU, default 128), RIDE_FAST_BENCH_GPU_STEPS (steps per GPU round,
default 10), RIDE_FAST_BENCH_ROUNDS (timed rounds, default 3 on the GPU and 5 on the CPU).
"""
from __future__ import annotations

import contextlib
import gc
import os
import time

import numpy as np
import pytest
import torch
from _original_structure import ORIGINAL_MODELS, OriginalRIDELoss, make_original_step
from _paired import time_paired, use_bench_threads
from _results import bf16_dense_tflops

from ride_fast.config import LossConfig, ModelConfig, OptimConfig, TrainConfig
from ride_fast.engine.optim import build_optimizer
from ride_fast.engine.runtime import resolve_amp
from ride_fast.engine.step import TrainStep
from ride_fast.losses import build_loss
from ride_fast.models import create_model
from ride_fast.ops import native, ran_ride_loss_op
from ride_fast.ops.conv3x3 import module_fits

GPU_STEPS = int(os.environ.get("RIDE_FAST_BENCH_GPU_STEPS", "10"))  # steps per timed round on the GPU
ROUNDS = int(os.environ.get("RIDE_FAST_BENCH_ROUNDS", "0"))  # timed rounds; 0: 3 on the GPU, 5 on the CPU
GPU_R50_BATCH = int(os.environ.get("RIDE_FAST_BENCH_GPU_BATCH", "128"))

# name -> (model, E, C, diversity_factor, reweight_factor, reweight_epoch, {device: (B, px)}, CI (B, px))
CASES = {
    "r32_e3": ("resnet32", 3, 100, -0.45, 0.05, 160, {"cpu": (128, 32), "gpu": (128, 32)}, (16, 32)),
    "r50_e3": ("resnet50", 3, 1000, -0.2, 0.02, 80, {"cpu": (8, 64), "gpu": (GPU_R50_BATCH, 224)}, (4, 32)),
    "r50_e4": ("resnet50", 4, 1000, -0.2, 0.02, 80, {"cpu": (8, 64), "gpu": (GPU_R50_BATCH, 224)}, (4, 32)),
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


def default_switches(device: torch.device) -> dict:
    """The settings of a run that sets none: the config's defaults, `train.amp=auto` resolved for
    `device` (bf16 on CPUs that multiply bf16 natively, else fp32)."""
    model, train = ModelConfig(), TrainConfig()
    return dict(loss_impl=LossConfig().impl, sgd=OptimConfig().implementation, channels_last=model.channels_last,
                batched=model.batched, amp=resolve_amp(train.amp, device), compile=train.compile, cuda_graphs=train.cuda_graphs)


def switches(variant: str, device: torch.device | None = None) -> dict:
    """The ride_fast settings of a variant: BASE plus every step up to and including it; "defaults":
    the engine's defaults on `device`."""
    if variant == "defaults":
        return default_switches(device or torch.device("cpu"))
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


_WEIGHTS: dict[str, tuple[dict, dict]] = {}


def initial_weights(case: str) -> tuple[dict, dict]:
    """(original state dict, ride_fast per-expert state dict) of the same network: the original
    structure at seed 0, loaded into ride_fast. Every variant of a case starts from these."""
    if case not in _WEIGHTS:
        from ride_fast.models import load_original_state_dict

        name, E, C = CASES[case][:3]
        torch.manual_seed(0)
        original = ORIGINAL_MODELS[name](C, E)
        net = create_model(name, num_classes=C, num_experts=E)
        load_original_state_dict(net, original.state_dict())
        _WEIGHTS[case] = ({k: v.clone() for k, v in original.state_dict().items()}, {k: v.clone() for k, v in net.state_dict().items()})
    return _WEIGHTS[case]


def batch(case: str, device: torch.device, B: int, px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's batch: the same images and labels for every variant."""
    g = torch.Generator().manual_seed(1)
    C = CASES[case][2]
    return torch.randn(B, 3, px, px, generator=g).to(device), torch.randint(0, C, (B,), generator=g).to(device)


def make_original(case: str, device: torch.device, B: int, px: int, *, with_model: bool = False):
    name, E, C, lam, gamma = CASES[case][:5]
    model = ORIGINAL_MODELS[name](C, E)
    model.load_state_dict(initial_weights(case)[0])
    model.to(device)
    criterion = OriginalRIDELoss(class_counts(C), diversity_factor=lam, reweight_factor=gamma).to(device)
    step = make_original_step(model, criterion, weight_decay=5e-4 if name == "resnet32" else 2e-4)
    images, labels = batch(case, device, B, px)
    fn = lambda: step(images, labels)  # noqa: E731
    return (fn, model) if with_model else fn


def build_ride_fast(case: str, variant: str, device: torch.device, B: int, px: int):
    """(TrainStep, images, labels) of a variant, from the case's initial weights."""
    name, E, C, lam, gamma, reweight_epoch = CASES[case][:6]
    s = switches(variant, device)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    model = create_model(name, num_classes=C, num_experts=E, batched=s["batched"])
    model.load_state_dict(initial_weights(case)[1])  # either layout loads the per-expert state dict
    model.to(device, memory_format=fmt)
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
    images, labels = batch(case, device, B, px)
    return step, images.contiguous(memory_format=fmt), labels


def make_ride_fast(case: str, variant: str, device: torch.device, B: int, px: int):
    step, images, labels = build_ride_fast(case, variant, device, B, px)
    return lambda: step(images, labels)


# ----------------------------------------------------------------------------------------- CI checks
# One step from the same weights and batch, the variant against the original structure: (rtol of the
# loss, rtol of the update: |w_variant - w_original| / |w_original - w_0| over every weight and
# statistic), per network, precision and layout on the CPU. Each bound is a few times the gap
# measured on the CI batch. The NCHW float32 variants do the original's arithmetic in another order;
# channels-last (oneDNN) and bf16 round differently, and ResNet-50 at 32 px (layer4 on one pixel,
# BatchNorm over 4 values) turns a rounding difference into a different update (float32 against
# float64 differs as much), so there only the loss is compared. None: not compared. On a GPU
# (cuDNN, TF32) only the loss is compared, at GPU_LOSS_RTOL.
TOLERANCES = {
    ("resnet32", "none", False): (1e-6, 2e-6),
    ("resnet32", "none", True): (1e-6, 5e-3),
    ("resnet32", "bf16", True): (2e-3, 0.5),
    ("resnet50", "none", False): (1e-6, 1e-5),
    ("resnet50", "none", True): (5e-4, None),
    ("resnet50", "bf16", True): (5e-2, None),
}
GPU_LOSS_RTOL = {"none": 1e-2, "bf16": 5e-2}
_REFERENCE: dict[tuple[str, str, int, int], tuple[float, dict]] = {}


def per_expert_state(model) -> dict:
    from ride_fast.models.layout import per_expert_state_dict

    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return per_expert_state_dict(state, model.num_experts) if getattr(model, "batched", False) else state


def reference_after_one_step(case: str, device: torch.device, B: int, px: int) -> tuple[float, dict]:
    """The original structure's loss on the batch and its weights after the step, in ride_fast's names."""
    key = (case, device.type, B, px)
    if key not in _REFERENCE:
        from ride_fast.models import load_original_state_dict

        name, E, C = CASES[case][:3]
        fn, original = make_original(case, device, B, px, with_model=True)
        loss = float(fn())
        net = create_model(name, num_classes=C, num_experts=E)
        load_original_state_dict(net, {k: v.cpu() for k, v in original.state_dict().items()})
        _REFERENCE[key] = (loss, per_expert_state(net))
    return _REFERENCE[key]


class Probe(torch.utils._python_dispatch.TorchDispatchMode):
    """What one step did: convolutions run (count, channels-last outputs, how many by the C 3x3
    kernel), fused BatchNorm + ReLU calls, the model output's dtypes (forward hook) and the loss's backward node (a wrapper of
    TrainStep._loss)."""

    def __init__(self, step: TrainStep):
        super().__init__()
        self.convolutions, self.layout_outputs, self.channels_last_outputs, self.fused_norms, self.kernel_convs = 0, 0, 0, 0, 0
        self.outputs, self.loss_backward = [], []
        self.step = step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.fused_norms += func is torch.ops.ride_fast.batch_norm_act.default
        self.kernel_convs += func is torch.ops.ride_fast.conv3x3.default
        if func in (torch.ops.aten.convolution.default, torch.ops.ride_fast.conv3x3.default):
            self.convolutions += 1
            if out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:  # else both layouts are the same memory
                self.layout_outputs += 1
                self.channels_last_outputs += out.is_contiguous(memory_format=torch.channels_last)
        return out

    def __enter__(self):
        self.hook = self.step.model.register_forward_hook(
            lambda m, i, out: self.outputs.append((out.features.dtype, out.expert_logits.dtype)))
        loss_fn = self.step._loss

        def spy(*args):
            loss = loss_fn(*args)
            self.loss_backward.append(ran_ride_loss_op(loss))
            return loss

        self.step._loss = spy
        self._restore = loss_fn
        return super().__enter__()

    def __exit__(self, *exc):
        self.hook.remove()
        self.step._loss = self._restore
        return super().__exit__(*exc)


def update_gap(got: dict, want: dict, start: dict) -> float:
    """|got - want| / |want - start| over all floating-point tensors (want: the original's weights after
    the step, start: before it); integer buffers (BatchNorm's step counts) must be equal."""
    num = den = 0.0
    for k, b in want.items():
        if not b.is_floating_point():
            assert torch.equal(got[k], b), k
            continue
        num += float(((got[k] - b).double() ** 2).sum())
        den += float(((b - start[k].float()).double() ** 2).sum())
    return (num / den) ** 0.5


def check_step_against_the_original(case: str, variant: str, device: torch.device, B: int, px: int):
    """One step of the variant from the case's weights and batch: loss and weights equal the
    original structure's (TOLERANCES), and each switch of the variant took effect. Returns the
    variant's step function (its next step)."""
    ref_loss, ref_state = reference_after_one_step(case, device, B, px)
    if variant == "original":
        fn = make_original(case, device, B, px)
        assert float(fn()) == ref_loss  # deterministic: the reference is this very computation
        return fn
    s = switches(variant, device)
    step, images, labels = build_ride_fast(case, variant, device, B, px)
    compiled = s["compile"] or s["cuda_graphs"]  # a dispatch mode and hooks would change the compiled graph
    probe = Probe(step) if not compiled else contextlib.nullcontext()
    with probe:
        loss = float(step(images, labels))
    name = CASES[case][0]
    loss_rtol, update_rtol = TOLERANCES[name, s["amp"], s["channels_last"]] if device.type == "cpu" else (GPU_LOSS_RTOL[s["amp"]], None)
    assert abs(loss - ref_loss) <= loss_rtol * abs(ref_loss), f"{case} {variant}: loss {loss} but the original's {ref_loss}"
    if update_rtol is not None:
        gap = update_gap(per_expert_state(step.model), ref_state, initial_weights(case)[1])
        assert gap <= update_rtol, f"{case} {variant}: the step's update is {gap:.2e} (relative) from the original's, bound {update_rtol}"
    if not compiled:
        check_switches(case, s, step, probe, device)
    return lambda: step(images, labels)


def check_switches(case: str, s: dict, step: TrainStep, probe: Probe, device: torch.device) -> None:
    from ride_fast.models import BatchedRIDENet

    name, E = CASES[case][:2]
    model = step.model
    assert probe.loss_backward == [s["loss_impl"] == "auto"], f"fused loss operator in the graph: {probe.loss_backward}, loss.impl={s['loss_impl']}"
    assert bool(step.optimizer.defaults.get("fused")) == (s["sgd"] == "auto")  # fused SGD on the CPU and CUDA
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) == s["channels_last"] for p in convs if p.shape[-1] > 1)
    assert probe.layout_outputs > 0 and probe.channels_last_outputs == (probe.layout_outputs if s["channels_last"] else 0), (
        f"{probe.channels_last_outputs} of {probe.layout_outputs} convolution outputs channels-last")
    assert isinstance(model, BatchedRIDENet) == s["batched"]
    # BatchNorm + add + ReLU as the C kernels: float32 or bf16 channels-last training on the CPU
    fused_norm = device.type == "cpu" and s["channels_last"] and s["amp"] in ("none", "bf16") and native.library() is not None
    assert (probe.fused_norms > 0) == fused_norm, f"{probe.fused_norms} fused BatchNorm calls (expected: {'some' if fused_norm else 'none'})"
    # 3x3 convolutions as the C kernel: every conv it fits, channels-last on the CPU (once each per forward), in float32,
    # and in bf16 where this CPU's bf16 products are no faster than float32 (else oneDNN's bf16 convolutions)
    kernel_precision = s["amp"] == "none" or (s["amp"] == "bf16" and not native.cpu_multiplies_bf16_faster())
    fits = sum(module_fits(m) for m in model.modules()) if device.type == "cpu" and s["channels_last"] and kernel_precision else 0
    assert probe.kernel_convs == fits, f"{probe.kernel_convs} convolutions by the C kernel, {fits} expected"
    per_expert = CONVOLUTIONS[name]
    expected = per_expert[0] + (1 if s["batched"] else E) * per_expert[1]  # trunk + experts
    assert probe.convolutions == expected, f"{probe.convolutions} convolutions in the step, {expected} expected"
    amp_dtype = {"none": torch.float32, "bf16": torch.bfloat16}[s["amp"]]
    assert probe.outputs == [(amp_dtype, torch.float32)]  # features in the autocast dtype; cosine heads in float32


# Convolutions of one forward: (shared trunk, one expert). ResNet-32: conv1 + layer1 (5 blocks x 2),
# an expert layer2 + layer3 (10 blocks x 2; the option-A shortcuts have none). ResNet-50: conv1 +
# layer1 (3 bottlenecks x 3 + downsample) + layer2 (4 x 3 + 1), an expert layer3 (6 x 3 + 1) + layer4
# (3 x 3 + 1). The per-expert network runs E experts' convolutions, the batched one all experts as
# one grouped convolution per layer.
CONVOLUTIONS = {"resnet32": (1 + 5 * 2, 10 * 2), "resnet50": (1 + 3 * 3 + 1 + 4 * 3 + 1, 6 * 3 + 1 + 3 * 3 + 1)}


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


CPU_COMPILE = bool(os.environ.get("RIDE_FAST_BENCH_CPU_COMPILE"))


def cases():
    """(where, case, variant) of every run: CUDA graphs only on the GPU, torch.compile on the CPU
    only when asked for (RIDE_FAST_BENCH_CPU_COMPILE=1: minutes of compile time, timed with
    --benchmark-only). GPU runs are skipped without CUDA (marker gpu)."""
    out = []
    for where in ("cpu", "gpu"):
        for case in CASES:
            for variant in VARIANTS:
                if where == "cpu" and (variant == "cuda_graphs" or (variant == "compile" and not CPU_COMPILE)):
                    continue
                marks = [pytest.mark.gpu] if where == "gpu" else []
                out.append(pytest.param(where, case, variant, id=f"{where}-{case}-{variant}", marks=marks))
    return out


@pytest.mark.parametrize("where,case,variant", cases())
def test_train_step(benchmark, where, case, variant):
    device = torch.device("cuda" if where == "gpu" else "cpu")
    timing = not benchmark.disabled
    if variant in ("compile", "cuda_graphs"):
        torch._dynamo.reset()  # every case compiles its own TrainStep: start from an empty cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.backends.cudnn.benchmark = True  # the original's run gets it too (a conservative baseline)
    else:
        use_bench_threads(timing)
    B, px = CASES[case][6][where] if timing else CASES[case][7]
    rounds = ROUNDS or (3 if device.type == "cuda" else 5)  # of GPU_STEPS steps on the GPU, of one step on the CPU
    warmup = 1
    steps_per_round = GPU_STEPS if device.type == "cuda" else 1

    key = (where, case, B)
    if not timing:  # CI: one step against the original's, its switches checked; the benchmark call is a second step
        fn = check_step_against_the_original(case, variant, device, B, px)
    elif variant == "original":
        fn = runner(make_original(case, device, B, px), device)
    else:
        if key not in _ORIGINAL_IPS:  # the baseline was not run in this pytest run (-k): time it here
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
            peak = bf16_dense_tflops(torch.cuda.get_device_name(device)) * 1e12
            info.update(peak_flops=peak, mfu=flops * ips / peak)
    benchmark.extra_info.update(info)
    if timing and variant == LAST_VARIANT[device.type]:  # every switch on: faster than the original structure
        assert info["speedup_best"] > 1.0, f"{case} {variant} on {info['device']}: {info['speedup_best']:.2f} x the original"


LAST_VARIANT = {"cpu": "bf16", "cuda": "cuda_graphs"}  # the last variant that runs by default on each device

CPU_DEFAULTS_GOAL = 1.5  # the defaults' speed-up over the original code's step on the CPU, median of the pairs
DEFAULTS_PAIRS = int(os.environ.get("RIDE_FAST_BENCH_STEP_PAIRS", "6"))


def test_cpu_defaults_against_the_original_code(benchmark):
    """The CPU goal: RIDE-ResNet-32 E=3, batch 128, one training step with every setting at its
    default (what `ride-fast train` runs: `default_switches`) against the original code's step,
    timed in A B B A pairs in one process: >= CPU_DEFAULTS_GOAL times faster (median of the pairs)
    when timing. In CI: one step of each from the same weights and batch, the same loss and update
    (TOLERANCES), every default switch in effect (`check_switches`)."""
    case, device = "r32_e3", torch.device("cpu")
    timing = not benchmark.disabled
    use_bench_threads(timing)
    s = default_switches(device)
    if not timing:
        benchmark(check_step_against_the_original(case, "defaults", device, *CASES[case][7]))
        return
    B, px = CASES[case][6]["cpu"]
    paired = benchmark.pedantic(lambda: time_paired(make_original(case, device, B, px), make_ride_fast(case, "defaults", device, B, px),
                                                    DEFAULTS_PAIRS), rounds=1, iterations=1)
    summary = paired.summary()
    benchmark.extra_info.update(summary, case=case, batch=B, px=px, switches=s, threads=torch.get_num_threads(), goal=CPU_DEFAULTS_GOAL,
                                torch=torch.__version__, images_per_s_original=B / summary["baseline_s_median"],
                                images_per_s_defaults=B / summary["contender_s_median"])
    assert summary["speedup_median"] >= CPU_DEFAULTS_GOAL, (
        f"the default step {summary['speedup_median']:.2f}x the original code's (RIDE-ResNet-32 E=3, batch {B}, amp {s['amp']}; "
        f"pairs {summary['speedups']}), goal {CPU_DEFAULTS_GOAL}x")


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
