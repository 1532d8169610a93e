"""Baseline classification losses and the input checks shared by every loss."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ride_fast.losses import (
    ClassBalancedCELoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    RIDEDistillLoss,
    RIDELoss,
)
from ride_fast.losses.synthetic import ride_loss_inputs

COUNTS = [300, 120, 40, 11, 2]  # C = 5


def _inputs(E, B, C, dtype=torch.float64, seed=0, scale=5.0):
    inp = ride_loss_inputs(E, B, C, dtype=dtype, seed=seed, scale=scale, confident=False)
    return inp.logits, inp.target


def _cb_weights(counts, beta):
    n = np.asarray(counts, dtype=np.float64)
    w = (1 - beta) / (1 - beta**n)
    return torch.tensor(w / w.sum() * len(counts))


@pytest.mark.parametrize("E", [1, 3])
def test_cross_entropy_is_sum_of_per_expert_means(E):
    logits, target = _inputs(E, 7, 5, seed=E)
    expected = sum(F.cross_entropy(logits[k], target) for k in range(E))
    torch.testing.assert_close(CrossEntropyLoss(COUNTS, impl="reference")(logits, target), expected)
    torch.testing.assert_close(CrossEntropyLoss(impl="reference")(logits, target), expected)  # counts optional


def test_cross_entropy_by_hand():
    # C = 2, logits [0, log 3], target 1: p = 3/4, CE = log(4/3)
    out = CrossEntropyLoss(impl="reference")(torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64), torch.tensor([1]))
    assert out.item() == pytest.approx(math.log(4.0 / 3.0), rel=1e-12)


def test_class_balanced_ce():
    logits, target = _inputs(2, 9, 5, seed=4)
    w = _cb_weights(COUNTS, 0.99)
    expected = sum(F.cross_entropy(logits[k], target, weight=w) for k in range(2))
    torch.testing.assert_close(ClassBalancedCELoss(COUNTS, beta=0.99, impl="reference")(logits, target), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epoch", [1, 10, 11])
def test_ldam_drw(epoch):
    logits, target = _inputs(3, 8, 5, seed=epoch)
    loss_mod = LDAMLoss(COUNTS, max_m=0.5, s=30.0, reweight_epoch=10, beta=0.9999, impl="reference")
    loss_mod.set_epoch(epoch)
    n = np.asarray(COUNTS, dtype=np.float64)
    m = torch.tensor(0.5 * n**-0.25 / (n**-0.25).max())
    weight = _cb_weights(COUNTS, 0.9999) if epoch > 10 else None
    assert loss_mod.phase == int(epoch > 10)
    expected = 0
    for k in range(3):
        x = logits[k].clone()
        x[torch.arange(8), target] -= 30.0 * m[target]
        expected = expected + F.cross_entropy(x, target, weight=weight)
    torch.testing.assert_close(loss_mod(logits, target), expected, rtol=1e-6, atol=1e-6)


def test_ldam_never_reweights_by_default():
    loss_mod = LDAMLoss(COUNTS)
    loss_mod.set_epoch(1000)
    assert loss_mod.phase == 0 and loss_mod.class_weights is None


@pytest.mark.parametrize("class_balanced", [False, True])
def test_focal_loss(class_balanced):
    logits, target = _inputs(2, 10, 5, seed=2)
    gamma = 2.0
    loss_mod = FocalLoss(COUNTS, gamma=gamma, class_balanced=class_balanced, beta=0.999)
    w = _cb_weights(COUNTS, 0.999)[target] if class_balanced else torch.ones(10, dtype=torch.float64)
    expected = 0
    for k in range(2):
        p = F.softmax(logits[k], dim=1)[torch.arange(10), target]
        fl = -((1 - p) ** gamma) * torch.log(p)
        expected = expected + (w * fl).sum() / w.sum()
    torch.testing.assert_close(loss_mod(logits, target), expected, rtol=1e-6, atol=1e-6)


def test_focal_by_hand_and_gamma_zero_is_ce():
    # C = 2, logits [0, 0], target 0: p = 1/2; gamma = 1: (1 - 1/2) * log 2 = log(2) / 2
    x = torch.zeros(1, 1, 2, dtype=torch.float64)
    assert FocalLoss(gamma=1.0)(x, torch.tensor([0])).item() == pytest.approx(math.log(2.0) / 2, rel=1e-12)
    logits, target = _inputs(3, 6, 5)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), CrossEntropyLoss(impl="reference")(logits, target))
    with pytest.raises(ValueError, match="needs class_counts"):
        FocalLoss(class_balanced=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LDAMLoss(COUNTS, s=5.0, impl="reference"),
        lambda: LDAMLoss(COUNTS, s=5.0, reweight_epoch=0, impl="reference"),
        lambda: ClassBalancedCELoss(COUNTS, impl="reference"),
        lambda: FocalLoss(COUNTS, gamma=2.0, class_balanced=True),
        lambda: FocalLoss(gamma=1.0),
        lambda: CrossEntropyLoss(impl="reference"),
    ],
)
def test_gradcheck(make):
    loss_mod = make()
    logits, target = _inputs(2, 4, 5, scale=1.0, seed=8)
    assert torch.autograd.gradcheck(lambda x: loss_mod(x, target), (logits.requires_grad_(True),))


@pytest.mark.parametrize("make", [CrossEntropyLoss, lambda: LDAMLoss(COUNTS), lambda: FocalLoss(COUNTS)])
def test_bf16_logits(make):
    logits, target = _inputs(2, 12, 5, dtype=torch.float32, seed=1)
    x = logits.to(torch.bfloat16)
    out = make()(x, target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, make()(x.float(), target))


# ---- bad inputs (every loss shares the same checks)

ALL_LOSSES = [
    lambda: RIDELoss(COUNTS),
    lambda: RIDELoss(COUNTS, classification="focal"),
    lambda: LDAMLoss(COUNTS),
    lambda: ClassBalancedCELoss(COUNTS),
    lambda: CrossEntropyLoss(COUNTS),
    lambda: FocalLoss(COUNTS),
]


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_target_out_of_range(make):
    logits, _ = _inputs(2, 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[5, 9\] outside \[0, C\) with C = 5"):
        make()(logits, torch.tensor([0, 5, 9, 5]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        make()(logits, torch.tensor([0, -1, 1, 2]))


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_bad_shapes_and_dtypes(make):
    loss_mod = make()
    logits, target = _inputs(2, 4, 5, dtype=torch.float32)
    with pytest.raises(TypeError, match="integer class indices"):
        loss_mod(logits, target.float())
    with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[4\]"):
        loss_mod(logits, target[:3])
    with pytest.raises(ValueError, match=r"target must have shape"):
        loss_mod(logits, target.view(4, 1))
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        loss_mod(logits[0], target)
    with pytest.raises(ValueError, match="C = 6 classes but the loss was built for 5"):
        loss_mod(torch.zeros(2, 4, 6), target)
    with pytest.raises(TypeError, match="floating point"):
        loss_mod(logits.long(), target)


def test_int32_targets_accepted():
    logits, target = _inputs(2, 4, 5)
    loss_mod = RIDELoss(COUNTS, impl="reference")
    torch.testing.assert_close(loss_mod(logits, target.int()), loss_mod(logits, target))


def test_range_check_skipped_off_cpu_without_debug(monkeypatch):
    # An accelerator's target is read back (a host sync) only under RIDE_FAST_DEBUG=1; the CPU's
    # always (free); the meta device's never (nothing to read).
    from ride_fast.losses import check_logits_and_target
    from ride_fast.losses.classification import range_check_reads_host

    cuda, cpu, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv("RIDE_FAST_DEBUG", raising=False)
    assert not range_check_reads_host(cuda) and range_check_reads_host(cpu) and not range_check_reads_host(meta)
    monkeypatch.setenv("RIDE_FAST_DEBUG", "1")
    assert range_check_reads_host(cuda) and range_check_reads_host(cpu) and not range_check_reads_host(meta)
    # meta tensors pass without a read, whatever the flag
    check_logits_and_target(torch.empty(2, 3, 5, device="meta"), torch.empty(3, dtype=torch.long, device="meta"), 5)
    # and the check is the one that runs: a CPU target out of range is refused under either setting
    for flag in ("0", "1"):
        monkeypatch.setenv("RIDE_FAST_DEBUG", flag)
        with pytest.raises(ValueError, match=r"outside \[0, C\)"):
            check_logits_and_target(torch.zeros(2, 3, 5), torch.tensor([0, 5, 1]), 5)


def test_debug_flag():
    from ride_fast.losses.classification import debug_checks_enabled

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("RIDE_FAST_DEBUG", "1")
        assert debug_checks_enabled()
        mp.setenv("RIDE_FAST_DEBUG", "0")
        assert not debug_checks_enabled()
    finally:
        mp.undo()


def test_distill_checks_targets_too():
    loss_mod = RIDEDistillLoss(RIDELoss(COUNTS))
    logits, target = _inputs(2, 4, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="outside"):
        loss_mod(logits, torch.tensor([0, 1, 2, 7]), torch.zeros(4, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda impl: RIDELoss(COUNTS, impl=impl),
        lambda impl: RIDELoss(COUNTS, diversity="pairwise", impl=impl),
        lambda impl: RIDELoss(COUNTS, classification="ce", impl=impl),
        lambda impl: LDAMLoss(COUNTS, reweight_epoch=0, impl=impl),
        lambda impl: ClassBalancedCELoss(COUNTS, impl=impl),
        lambda impl: CrossEntropyLoss(COUNTS, impl=impl),
    ],
)
@pytest.mark.parametrize("epoch", [1, 500])
def test_auto_impl_matches_reference_float32(make, epoch):
    # whatever "auto" picks on this machine must agree with the reference in float32
    logits, target = _inputs(3, 16, 5, dtype=torch.float32, seed=epoch, scale=10.0)
    losses = [make("auto"), make("reference")]
    grads, values = [], []
    for loss_mod in losses:
        loss_mod.set_epoch(epoch)
        x = logits.clone().requires_grad_(True)
        out = loss_mod(x, target)
        out.backward()
        values.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
