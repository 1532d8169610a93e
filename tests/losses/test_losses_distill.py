"""Self-distillation wrapper (docs/method.md §4)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from ride_fast.losses import CrossEntropyLoss, RIDEDistillLoss, RIDELoss
from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops.ride_loss_design import _TRITON_INSTALLED, scaled_before_backward

COUNTS = [200, 60, 20, 9, 4, 1, 1]  # C = 7


def _inputs(E, B, C, seed=0, scale=4.0, dtype=torch.float64):
    inp = ride_loss_inputs(E, B, C, dtype=dtype, seed=seed, scale=scale, confident=False)
    g = torch.Generator().manual_seed(seed + 1)
    teacher = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    return inp.logits, inp.target, teacher


def _hand(base, student, target, teacher, T, scale):
    s = F.log_softmax(student.mean(0) / T, dim=1)
    t = F.softmax(teacher / T, dim=1)
    kl = F.kl_div(s, t, reduction="batchmean")
    return scale * (base(student, target) + T * T * kl)


@pytest.mark.parametrize("E", [1, 3, 4])
@pytest.mark.parametrize("epoch", [1, 161])
def test_matches_hand_formula(E, epoch):
    student, target, teacher = _inputs(E, 6, 7, seed=E)
    base = RIDELoss(COUNTS, impl="reference")
    loss_mod = RIDEDistillLoss(base, temperature=1.5)
    loss_mod.set_epoch(epoch)
    assert base.phase == int(epoch > 160)  # set_epoch forwards
    torch.testing.assert_close(loss_mod(student, target, teacher), _hand(base, student, target, teacher, 1.5, E))


def test_scale_by_experts_off_divides_by_E():
    student, target, teacher = _inputs(4, 5, 7)
    on = RIDEDistillLoss(RIDELoss(COUNTS), temperature=2.0)(student, target, teacher)
    off = RIDEDistillLoss(RIDELoss(COUNTS), temperature=2.0, scale_by_experts=False)(student, target, teacher)
    torch.testing.assert_close(off, on / 4)


def test_by_hand_kl_only():
    # E = 1 CE base. Teacher [0, 0] -> p_t = [1/2, 1/2]; student [0, 2 log 2] at T = 2 ->
    # p_s = softmax([0, log 2]) = [1/3, 2/3]. KL = 1/2 log(3/2) + 1/2 log(3/4) = 1/2 log(9/8).
    # Total = CE(student) + T^2 * KL = log(1 + 4) [target 0: p = 1/5] + 4 * 1/2 log(9/8).
    import math

    student = torch.tensor([[[0.0, 2 * math.log(2.0)]]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    out = RIDEDistillLoss(CrossEntropyLoss(impl="reference"), temperature=2.0)(student, torch.tensor([0]), teacher)
    assert out.item() == pytest.approx(math.log(5.0) + 2.0 * math.log(9.0 / 8.0), rel=1e-12)


def test_no_gradient_into_teacher():
    student, target, teacher = _inputs(3, 4, 7, dtype=torch.float32)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    loss = RIDEDistillLoss(RIDELoss(COUNTS))(student, target, teacher)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("epoch", [1, 161])
def test_gradcheck(epoch):
    student, target, teacher = _inputs(2, 3, 5, scale=1.0, seed=epoch)
    loss_mod = RIDEDistillLoss(RIDELoss(COUNTS[:5], s=3.0, impl="reference"), temperature=1.5)
    loss_mod.set_epoch(epoch)
    assert torch.autograd.gradcheck(lambda x: loss_mod(x, target, teacher), (student.requires_grad_(True),))


def test_bf16():
    student, target, teacher = _inputs(2, 8, 7, dtype=torch.bfloat16)
    loss_mod = RIDEDistillLoss(RIDELoss(COUNTS))
    out = loss_mod(student, target, teacher)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss_mod(student.float(), target, teacher.float()))


def test_errors():
    student, target, teacher = _inputs(2, 4, 7, dtype=torch.float32)
    loss_mod = RIDEDistillLoss(RIDELoss(COUNTS))
    with pytest.raises(ValueError, match=r"teacher_logits must be \[B, C\] = \[4, 7\]"):
        loss_mod(student, target, teacher[:3])
    with pytest.raises(ValueError, match="teacher_logits must be"):
        loss_mod(student, target, teacher.expand(6, 4, 7))
    with pytest.raises(TypeError, match="ExpertLoss"):
        RIDEDistillLoss(torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="temperature"):
        RIDEDistillLoss(RIDELoss(COUNTS), temperature=0.0)


class _DesignRecorder(CrossEntropyLoss):
    """A base loss that notes the fused loss's design for the logits it is given."""

    def __init__(self):
        super().__init__(impl="reference")
        self.designs, self.grad_outputs = [], []

    def forward(self, expert_logits, target, weight_sum=None):
        from ride_fast.ops.ride_loss_design import declared_grad_scale, fused_loss_design

        self.designs.append((fused_loss_design(expert_logits), declared_grad_scale()))
        loss = super().forward(expert_logits, target, weight_sum)
        if loss.requires_grad:
            loss.register_hook(lambda g: self.grad_outputs.append(float(g)))
        return loss


@pytest.mark.skipif(not _TRITON_INSTALLED, reason="the fused loss's designs need triton")
def test_the_factor_E_is_declared_to_the_fused_loss():
    """With scale_by_experts the base loss is multiplied by E before backward, so its grad_output
    is E: the distillation loss declares it (`scaled_before_backward`), and the fused loss writes
    its gradient in the forward for that grad_output; inside a micro-batch's declared share the
    two multiply (float32, the share first, as autograd forms them). Checked against the
    grad_output the base loss gets."""
    student, target, teacher = _inputs(3, 6, 7, dtype=torch.float32)
    seen = {}
    for name, scale_by_experts, logits, share in (("E", True, student, None), ("no_factor", False, student, None),
                                                   ("one_expert", True, student[:1], None), ("E_share", True, student, 1 / 7)):
        base = _DesignRecorder()
        x = logits.clone().requires_grad_()
        with scaled_before_backward(share) if share else contextlib.nullcontext():
            loss = RIDEDistillLoss(base, temperature=1.5, scale_by_experts=scale_by_experts)(x, target, teacher)
        (loss * share if share else loss).backward()
        seen[name] = base.designs, base.grad_outputs
    three_sevenths = float(torch.tensor(1 / 7, dtype=torch.float32) * 3)  # 0.42857146, not float32(3 / 7)
    assert seen == {"E": ([("grad_in_forward", 3.0)], [3.0]), "no_factor": ([("grad_in_forward", 1.0)], [1.0]),
                    "one_expert": ([("grad_in_forward", 1.0)], [1.0]),
                    "E_share": ([("grad_in_forward", three_sevenths)], [three_sevenths])}
