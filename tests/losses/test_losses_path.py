"""A loss reports the implementation its forward runs (`ExpertLoss.path`, what the trainer logs):
checked against the autograd graph of a real call on the CPU, where the registered RIDE loss
operator (the closed form, "analytic") leaves its own backward node and the reference does not.

Shape legend: E experts, B images, C classes.
"""
from __future__ import annotations

import pytest
import torch

from ride_fast.config import LossConfig
from ride_fast.losses import build_loss, loss_path
from ride_fast.losses.classification import (
    ClassBalancedCELoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
)
from ride_fast.losses.distill import RIDEDistillLoss
from ride_fast.losses.ride import RIDELoss
from ride_fast.ops import call_path, ran_ride_loss_op

COUNTS = [40, 20, 10, 6, 3, 2]
E, B, C = 3, 5, len(COUNTS)
def losses():
    yield "ce", CrossEntropyLoss(COUNTS)
    yield "ce reference", CrossEntropyLoss(COUNTS, impl="reference")
    yield "cb-ce", ClassBalancedCELoss(COUNTS)
    yield "ldam-drw", LDAMLoss(COUNTS, reweight_epoch=1)
    yield "focal", FocalLoss(COUNTS)
    for diversity in ("mean", "pairwise"):
        yield f"ride {diversity}", RIDELoss(COUNTS, diversity=diversity, reweight_epoch=1)
    yield "ride reference", RIDELoss(COUNTS, impl="reference")
    yield "ride collaborative", RIDELoss(COUNTS, individual=False)
    yield "ride focal", RIDELoss(COUNTS, classification="focal")
    yield "ride ce", RIDELoss(COUNTS, classification="ce")
    yield "ride lambda 0 on mean logits", RIDELoss(COUNTS, diversity_factor=0.0, zero_diversity_on_mean_logits=True)


@pytest.mark.parametrize("epoch", [1, 2])
def test_path_is_what_forward_runs(epoch):
    g = torch.Generator().manual_seed(epoch)
    z = torch.randn(E, B, C, generator=g).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    seen = set()
    for name, loss in losses():
        loss.set_epoch(epoch)
        path = loss.path("cpu", torch.float32, E, C)
        assert path in ("analytic", "reference"), (name, path)  # "triton" needs CUDA for "auto"
        assert ran_ride_loss_op(loss(z, y)) == (path == "analytic"), (name, path)
        assert loss_path(loss, "cpu", E, C) == path, name
        seen.add(path)
    assert seen == {"analytic", "reference"}


def test_distillation_reports_its_base_loss():
    for base in (RIDELoss(COUNTS), RIDELoss(COUNTS, classification="focal")):
        wrapped = RIDEDistillLoss(base)
        assert loss_path(wrapped, "cpu", E, C) == base.path("cpu", torch.float32, E, C)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(E, B, C, generator=g).requires_grad_()
        y = torch.randint(0, C, (B,), generator=g)
        out = wrapped(z, y, torch.randn(B, C, generator=g))
        assert ran_ride_loss_op(out) == (base.path("cpu") == "analytic")


def test_built_losses_report_their_path():
    counts = torch.tensor(COUNTS).numpy()
    for name in ("ride", "ldam", "ce", "cb_ce", "focal"):
        loss = build_loss(LossConfig(name=name), counts) if name != "ride" else build_loss(LossConfig(), counts)
        want = "reference" if name == "focal" else "analytic"
        assert loss_path(loss, "cpu", E, C) == want, name


def test_call_path_on_cuda_follows_impl_and_the_kernels_limits():
    """Pure host logic: the same decision on any machine."""
    assert call_path("triton", "cuda", torch.float32, E, C) == "triton"
    assert call_path("reference", "cuda", torch.float32, E, C) == "reference"
    assert call_path("triton", "cuda", torch.float32, E, C, individual=False) == "reference"
    assert call_path("auto", "cuda", torch.float32, E, C, constants=False) == "reference"
    assert call_path("auto", "cpu", torch.bfloat16, E, C) == "analytic"
    assert call_path("auto", "cuda", torch.float64, E, C) == "analytic"


def test_one_target_range_scan_a_call(monkeypatch):
    """The range 0 <= y < C is read back once a call on the CPU: by the operator on its closed-form
    path, by the loss module on every other path; a target out of range is still refused."""
    import importlib

    classification = importlib.import_module("ride_fast.losses.classification")
    ops_ride_loss = importlib.import_module("ride_fast.ops.ride_loss")
    scans = []
    module_scan, op_scan = classification.check_target_range, ops_ride_loss._check_target_range
    monkeypatch.setattr(classification, "check_target_range", lambda *a: scans.append("module") or module_scan(*a))
    monkeypatch.setattr(ops_ride_loss, "_check_target_range", lambda *a: scans.append("op") or op_scan(*a))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(E, B, C, generator=g).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    for name, loss in [*losses(), ("distill", RIDEDistillLoss(RIDELoss(COUNTS)))]:
        scans.clear()
        out = loss(z, y, torch.randn(B, C)) if name == "distill" else loss(z, y)
        assert len(scans) == 1, (name, scans)
        assert scans == (["op"] if ran_ride_loss_op(out) else ["module"]), (name, scans)
        bad = y.clone()
        bad[1] = C
        with pytest.raises(ValueError, match=rf"outside \[0, C\) with C = {C}"):
            loss(z, bad, torch.randn(B, C)) if name == "distill" else loss(z, bad)
