"""Gradient accumulation (train.accumulate_steps): one optimizer step over micro-batches equals the
step over the whole batch; DDP synchronises on the last micro-batch only; CUDA graphs refuse it.

Shape legend: B images, E experts, C classes.

The equality is checked in float64 with BatchNorm in eval mode. Eval mode is what makes it exact:
with momentum 0 the running statistics stay frozen, but a training-mode forward still normalises
each micro-batch with its own mean and variance, which differ from the whole batch's.
"""
import contextlib
import importlib.util

import numpy as np
import pytest
import torch

from ride_fast.config import ConfigError, LossConfig, OptimConfig, load_config
from ride_fast.engine import TrainStep, build_optimizer
from ride_fast.losses import build_loss
from ride_fast.models import create_model

C, E = 5, 2
COUNTS = np.array([9, 6, 4, 3, 2])


def _step_result(accumulate_steps: int, x, y, *, steps: int = 2, epoch: int = 1, loss: str = "ride"):
    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=C, num_experts=E, batched=True).double().eval()  # BatchNorm frozen
    crit = build_loss(LossConfig(name=loss, reweight_epoch=1), COUNTS).double()
    crit.set_epoch(epoch)  # epoch 2: after the DRW switch, a class-weighted batch mean
    opt = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
    step = TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none", accumulate_steps=accumulate_steps)
    losses = torch.stack([step(x, y) for _ in range(steps)])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params, step.read_metrics()


@pytest.mark.parametrize("loss,epoch", [("ride", 1), ("ride", 2), ("ldam", 2), ("cb_ce", 1)],
                         ids=["ride_before_drw", "ride_drw", "ldam_drw", "cb_ce"])
@pytest.mark.parametrize("accumulate_steps,B", [(2, 8), (3, 8)], ids=["2_equal", "3_short_last"])
def test_accumulated_step_equals_the_whole_batch_step_in_float64(accumulate_steps, B, loss, epoch):
    """Class-weighted means too: each micro-batch divides by its share of the whole batch's weight
    sum, not by its own (the batch below puts the rare classes 3 and 4 in the first half)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:B])
    l_one, p_one, m_one = _step_result(1, x, y, epoch=epoch, loss=loss)
    l_acc, p_acc, m_acc = _step_result(accumulate_steps, x, y, epoch=epoch, loss=loss)
    torch.testing.assert_close(l_acc.double(), l_one.double(), rtol=1e-6, atol=1e-6)  # the loss is recorded in float32
    moved = [n for n in p_one if not torch.equal(p_one[n], p_acc[n])]
    for n in p_one:
        torch.testing.assert_close(p_acc[n], p_one[n], rtol=1e-12, atol=1e-12)
    assert moved, "the two runs are the same object: the comparison proves nothing"
    assert m_acc["correct"] == m_one["correct"] and m_acc["seen"] == m_one["seen"] == 2 * B


def test_train_mode_batchnorm_normalises_per_micro_batch():
    """The documented difference: with BatchNorm in training mode, micro-batches are not the whole batch."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    results = []
    for A in (1, 2):
        torch.manual_seed(0)
        model = create_model("resnet32", num_classes=C, num_experts=E, batched=True).double().train()
        crit = build_loss(LossConfig(name="ride", reweight_epoch=1), COUNTS).double()
        opt = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
        TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none", accumulate_steps=A)(x, y)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (results[0] - results[1]).abs().max() > 1e-9


class _RecordsNoSync(torch.nn.Module):
    """A model wrapper with DDP's `no_sync`: records, per backward, whether gradient sync was off."""

    def __init__(self, model):
        super().__init__()
        self.module, self.syncing, self.calls = model, True, []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.calls.append(self.syncing)
        return self.module(x)


def test_ddp_syncs_gradients_on_the_last_micro_batch_only():
    torch.manual_seed(0)
    model = _RecordsNoSync(create_model("resnet32", num_classes=C, num_experts=E, batched=True))
    crit = build_loss(LossConfig(name="ride", reweight_epoch=1), COUNTS)
    opt = build_optimizer(model.module, OptimConfig(), torch.device("cpu"))
    step = TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none", accumulate_steps=4)
    step(torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    assert model.calls == [False, False, False, True]


def test_accumulation_refuses_counts_below_one():
    with pytest.raises(ConfigError, match=r"train.accumulate_steps .* integer >= 1, got 0"):
        load_config(overrides=["train.accumulate_steps=0"])


def test_a_real_ddp_model_accumulates_like_the_plain_model(tmp_path):
    """DDP's own no_sync path (gloo, one rank): the accumulated step equals the plain whole-batch step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    _, p_one, _ = _step_result(1, x, y, steps=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = create_model("resnet32", num_classes=C, num_experts=E, batched=True).double().eval()
        ddp = DistributedDataParallel(model)
        crit = build_loss(LossConfig(name="ride", reweight_epoch=1), COUNTS).double()
        opt = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
        TrainStep(ddp, crit, opt, device=torch.device("cpu"), amp="none", accumulate_steps=2)(x, y)
    finally:
        dist.destroy_process_group()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), p_one[n], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_accumulated_step_matches_eager_on_the_cpu():
    """train.compile with train.accumulate_steps: the compiled forward + loss runs once per micro-batch."""
    from test_engine_step import TinyRIDE

    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = TinyRIDE()
        crit = build_loss(LossConfig(reweight_epoch=1), COUNTS)
        crit.set_epoch(2)
        opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
        step = TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none", compile=compile, accumulate_steps=2)
        g = torch.Generator().manual_seed(1)
        losses = [step(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, C, (8,), generator=g)).clone() for _ in range(3)]
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (l_eager, p_eager), (l_compiled, p_compiled) = results
    torch.testing.assert_close(l_compiled, l_eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(p_compiled, p_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp16_grad_scaler_scales_every_micro_batch_and_steps_and_updates_once():
    """train.amp=fp16: one GradScaler step and update per optimizer step, so the scaler's state
    (scale, growth tracker) and the weights follow the unaccumulated run (to fp16 rounding)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    runs = []
    for A in (1, 2):
        torch.manual_seed(0)
        model = create_model("resnet32", num_classes=C, num_experts=E, batched=True).eval()
        crit = build_loss(LossConfig(name="ride", reweight_epoch=1), COUNTS)
        opt = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
        step = TrainStep(model, crit, opt, device=torch.device("cpu"), amp="fp16", accumulate_steps=A)
        step.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        start = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            step(x, y)
        runs.append(([p.detach().clone() for p in model.parameters()], start, step.scaler.state_dict()))
    (p_one, start, s_one), (p_acc, _, s_acc) = runs
    assert s_acc == s_one
    assert max(float((a - b).abs().max()) for a, b in zip(p_one, start)) > 0.1  # the weights moved
    for a, b in zip(p_acc, p_one):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused loss's designs need triton")
@pytest.mark.parametrize("accumulate_steps,shares", [(1, [1.0]), (2, [4 / 7, 3 / 7]), (3, [3 / 7, 2 / 7, 2 / 7])])
def test_micro_batches_declare_their_share_to_the_fused_loss(accumulate_steps, shares, monkeypatch):
    """A micro-batch's loss is multiplied by its share of the batch before backward, so the step
    declares that share (`scaled_before_backward`): the fused loss writes its gradient in the
    forward for exactly the grad_output autograd then brings (float32), and its backward keeps it.
    Read where the loss runs (float32 logits; the CPU's loss runs the analytic path, the
    declaration is the same)."""
    from ride_fast.ops.ride_loss_design import declared_grad_scale, fused_loss_design

    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=C, num_experts=E, batched=True).eval()
    crit = build_loss(LossConfig(name="ride", reweight_epoch=1), COUNTS)
    seen, grad_outputs, forward = [], [], type(crit).forward

    def recording(self, z, *a, **kw):
        seen.append((fused_loss_design(z), declared_grad_scale()))
        loss = forward(self, z, *a, **kw)
        loss.register_hook(lambda g: grad_outputs.append(float(g)))
        return loss

    monkeypatch.setattr(type(crit), "forward", recording)
    opt = build_optimizer(model, OptimConfig(lr=0.1), torch.device("cpu"))
    x, y = torch.randn(7, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    TrainStep(model, crit, opt, device=torch.device("cpu"), amp="none", accumulate_steps=accumulate_steps)(x, y)
    expected = [float(torch.tensor(s, dtype=torch.float32)) for s in shares]
    assert seen == [("grad_in_forward", s) for s in expected]
    assert grad_outputs == expected, "the grad_output the loss gets is not the one declared"
