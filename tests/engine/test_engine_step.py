"""The trainer's fast path: config switches and their defaults, batched experts in training,
layout-independent checkpoints, the step without host syncs, prefetch, torch.compile and CUDA graphs.

Shape legend: B images, E experts, C classes.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ride_fast.config import Config, LossConfig, OptimConfig, load_config
from ride_fast.data.dataset import Batch
from ride_fast.engine import (
    Trainer,
    TrainStep,
    build_optimizer,
    load_checkpoint,
    load_model_from_checkpoint,
)
from ride_fast.engine.step import prefetch_to_device
from ride_fast.losses import build_loss
from ride_fast.models import (
    BatchedRIDENet,
    RIDENet,
    RIDEOutput,
    create_model,
    per_expert_state_dict,
)
from ride_fast.models.layout import is_per_expert_layout

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps_per_epoch=2",
        "train.progress=false", "model.num_experts=2", "loss.reweight_epoch=1", "optim.warmup_epochs=1",
        "optim.milestones=[1]", "train.amp=none"]


def tiny_cfg(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"train.out_dir={tmp_path}", *extra])


def test_defaults_are_the_fast_path():
    cfg = Config()
    assert cfg.model.batched and cfg.model.channels_last
    assert cfg.train.amp == "auto" and cfg.optim.implementation == "auto" and cfg.loss.impl == "auto"
    assert cfg.train.prefetch and cfg.train.cudnn_benchmark
    assert not cfg.train.compile and not cfg.train.cuda_graphs  # opt-in: compile time, static shapes
    over = load_config(overrides=["model.batched=false", "train.compile=true", "train.cuda_graphs=true", "train.prefetch=false"])
    assert not over.model.batched and over.train.compile and over.train.cuda_graphs and not over.train.prefetch


def _params(model):
    """Parameters in the per-expert layout, whatever the model's layout."""
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    return per_expert_state_dict(sd, model.num_experts) if model.batched else sd


def test_batched_and_per_expert_training_agree(tmp_path):
    runs = {}
    for batched in (False, True):
        t = Trainer(tiny_cfg(tmp_path / str(batched), f"model.batched={str(batched).lower()}"), log=lambda s: None)
        assert isinstance(t.model, BatchedRIDENet) == batched
        result = t.train_epoch(1)
        runs[batched] = (result.loss, _params(t.model))
    # fp32 rounding of grouped vs separate convs, amplified by two SGD steps at lr 0.1 (the exact
    # equality of outputs and gradients is tested in float64 in tests/models/test_models_batched.py)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for name, p in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], p, rtol=1e-3, atol=2e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpoints_are_per_expert_and_resume_in_either_layout(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=1", "model.batched=true"), log=lambda s: None)
    t.fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert "batched" not in ckpt["model_args"] and is_per_expert_layout(ckpt["model"])
    per = create_model(**ckpt["model_args"])
    per.load_state_dict(ckpt["model"])
    assert type(per) is RIDENet
    shapes = [p.shape for p in per.parameters()]
    momentum = ckpt["optimizer"]["state"]
    assert len(momentum) == len(shapes) and all(momentum[i]["momentum_buffer"].shape == s for i, s in enumerate(shapes))

    resumed = {}
    for batched in (False, True):
        r = Trainer(tiny_cfg(tmp_path / f"r{batched}", "train.epochs=2", f"model.batched={str(batched).lower()}"), log=lambda s: None)
        r.resume(tmp_path / "last.pt")
        # exactly the trained weights and momentum buffers, in this trainer's layout
        for name, p in _params(r.model).items():
            assert torch.equal(p, dict(per.named_parameters())[name]), name
        saved = r.state_dict()["optimizer"]["state"]
        assert all(torch.equal(saved[i]["momentum_buffer"], momentum[i]["momentum_buffer"]) for i in momentum)
        r.fit()
        resumed[batched] = _params(r.model)
    for name, p in resumed[False].items():
        torch.testing.assert_close(resumed[True][name], p, rtol=1e-3, atol=2e-3)

    model, _ = load_model_from_checkpoint(tmp_path / "last.pt", batched=True)
    assert isinstance(model, BatchedRIDENet)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x).expert_logits, per.eval()(x).expert_logits, rtol=1e-4, atol=1e-4)


def test_train_step_keeps_metrics_on_the_device():
    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=5, num_experts=2, batched=True)
    crit = build_loss(LossConfig(reweight_epoch=1), np.array([9, 5, 4, 3, 2]))
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    step = TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none")
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    losses = [step(x, y) for _ in range(2)]
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in losses)
    assert step.seen == 12 and step.loss_sum.shape == () and step.correct.dtype == torch.long
    torch.testing.assert_close(step.loss_sum, 6 * (losses[0] + losses[1]))
    with pytest.raises(ValueError, match="train.cuda_graphs=true needs a CUDA device"):
        TrainStep(model, crit, opt, device=torch.device("cpu"), cuda_graphs=True)


def test_prefetch_passes_device_batches_through_on_the_cpu():
    batches = [Batch(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])) for _ in range(3)]
    out = list(prefetch_to_device(iter(batches), torch.device("cpu")))
    assert all(a is b for a, b in zip(out, batches)) and len(out) == 3
    assert list(prefetch_to_device(iter([]), torch.device("cpu"))) == []


class TinyRIDE(nn.Module):
    """A small RIDE-shaped network (conv trunk, E linear heads) for the compile tests."""

    def __init__(self, num_experts=2, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.heads = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(num_experts))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))  # [B, 8]
        z = torch.stack([head(h) for head in self.heads])  # [E, B, C]
        return RIDEOutput(z.mean(0), z, h.expand(len(self.heads), -1, -1))


def _compiled_vs_eager(device, steps=3, **step_kwargs):
    counts = np.array([9, 5, 4, 3, 2])
    results = []
    for kwargs in ({}, step_kwargs):
        torch.manual_seed(0)
        model = TinyRIDE().to(device)
        crit = build_loss(LossConfig(reweight_epoch=1), counts).to(device)
        crit.set_epoch(2)
        opt = build_optimizer(model, OptimConfig(), device)
        step = TrainStep(model, crit, opt, device=device, amp="none", **kwargs)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randn(8, 3, 8, 8, generator=g).to(device)
            y = torch.randint(0, 5, (8,), generator=g).to(device)
            losses.append(step(x, y).clone())
        results.append((torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}))
    (l_eager, p_eager), (l_fast, p_fast) = results
    torch.testing.assert_close(l_fast, l_eager, rtol=1e-4, atol=1e-5)
    for n, p in p_eager.items():
        torch.testing.assert_close(p_fast[n], p, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("compile_loss", [True, False], ids=["loss_compiled", "loss_eager"])
def test_compiled_step_matches_eager_on_the_cpu(compile_loss):
    _compiled_vs_eager(torch.device("cpu"), compile=True, compile_loss=compile_loss)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_step_has_no_host_syncs():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=100, num_experts=3, batched=True).to(device, memory_format=torch.channels_last)
    crit = build_loss(LossConfig(reweight_epoch=1), np.arange(100, 0, -1)).to(device)
    crit.set_epoch(2)
    opt = build_optimizer(model, OptimConfig(), device)
    step = TrainStep(model, crit, opt, device=device, amp="auto")
    assert step.amp == "bf16"
    x = torch.randn(64, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (64,), device=device)
    step(x, y)  # warm-up: cuDNN autotuning, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(step.loss_sum)


def _fast_and_plain_updates(device):
    """One training step of the fast path (batched experts, channels-last, the default loss path)
    and of the plain one (per-expert NCHW, reference loss), fp32, from the same weights and batch:
    (loss of each, the relative L2 distance of the two updates over all parameters).

    One step, not several: from a fresh initialisation at lr 0.1, fp32 rounding differences grow
    about tenfold a step (the first update differs by ~0.4 %, the third by ~7 % on the CPU), and a
    few weight gradients of the first step are ill-conditioned (4 % apart between NCHW and
    channels-last oneDNN alike), so the whole update is compared, not each tensor's worst element.
    """
    counts = np.arange(100, 0, -1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (32,), generator=g).to(device)
    losses, updates = [], []
    for batched, fmt, impl in ((False, torch.contiguous_format, "reference"), (True, torch.channels_last, "auto")):
        torch.manual_seed(0)
        model = create_model("resnet32", num_classes=100, num_experts=3, batched=batched).to(device, memory_format=fmt)
        crit = build_loss(LossConfig(reweight_epoch=1, impl=impl), counts).to(device)
        crit.set_epoch(2)
        before = _params(model)
        step = TrainStep(model, crit, build_optimizer(model, OptimConfig(), device), device=device, amp="none")
        losses.append(float(step(x.contiguous(memory_format=fmt), y)))
        after = _params(model)
        updates.append(torch.cat([(after[n] - before[n]).double().flatten().cpu() for n in sorted(before)]))
    return losses, float((updates[1] - updates[0]).norm() / updates[0].norm())


def test_fast_path_trains_as_the_plain_step():
    """On the CPU: the batched channels-last step with the default loss path takes the plain step's
    update (a wrong loss gradient, e.g. no diversity term, moves it by ~40 %)."""
    (plain, fast), distance = _fast_and_plain_updates(torch.device("cpu"))
    assert fast == pytest.approx(plain, rel=1e-5)
    assert distance < 0.02


@pytest.mark.gpu
def test_gpu_fast_path_matches_the_plain_step(no_tf32):
    """On CUDA (the fused Triton loss), TF32 off on both sides: the same first update."""
    (plain, fast), distance = _fast_and_plain_updates(torch.device("cuda"))
    assert fast == pytest.approx(plain, rel=1e-5)
    assert distance < 0.02


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager():
    """The compiled forward inside the captured step: three eager warm-up steps, then replays."""
    _compiled_vs_eager(torch.device("cuda"), steps=6, compile=True, cuda_graphs=True)


@pytest.mark.gpu
def test_gpu_prefetch_moves_host_batches_in_order():
    batches = [Batch(torch.randn(4, 3, 8, 8), torch.arange(4) + i) for i in range(4)]
    out = list(prefetch_to_device(iter(batches), torch.device("cuda")))
    assert len(out) == 4
    for a, b in zip(out, batches):
        assert a.images.is_cuda and a.labels.is_cuda
        assert torch.equal(a.images.cpu(), b.images) and torch.equal(a.labels.cpu(), b.labels)
    # batches already on the GPU ("cuda" and "cuda:0" alike) pass through untouched
    on_gpu = [Batch(b.images.cuda(), b.labels.cuda()) for b in batches]
    for device in ("cuda", "cuda:0"):
        assert all(a is b for a, b in zip(prefetch_to_device(iter(on_gpu), torch.device(device)), on_gpu))
