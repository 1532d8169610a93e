"""build_loss: config -> loss module."""
import pytest
import torch

from ride_fast.config import DistillConfig, LossConfig
from ride_fast.losses import (
    LOSS_NAMES,
    ClassBalancedCELoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    RIDEDistillLoss,
    RIDELoss,
    build_loss,
    loss_path,
)

COUNTS = [50, 20, 8, 3, 1]


@pytest.mark.parametrize(
    "name, cls",
    [("ride", RIDELoss), ("ce", CrossEntropyLoss), ("cb_ce", ClassBalancedCELoss), ("ldam", LDAMLoss), ("focal", FocalLoss)],
)
def test_every_name_builds_and_runs(name, cls):
    loss_mod = build_loss(LossConfig(name=name, impl="reference"), COUNTS)
    assert type(loss_mod) is cls
    loss_mod.set_epoch(3)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    out = loss_mod(logits, torch.tensor([0, 1, 2, 4]))
    assert out.shape == () and torch.isfinite(out)
    out.backward()
    assert name in LOSS_NAMES


def test_ride_options_are_passed():
    cfg = LossConfig(
        name="ride", max_m=0.3, s=16.0, diversity_factor=-0.2, diversity="pairwise", individual=False,
        classification="focal", reweight=False, reweight_epoch=80, reweight_factor=0.02,
        base_temperature=2.0, beta=0.999, focal_gamma=2.0, impl="reference",
    )
    loss_mod = build_loss(cfg, COUNTS)
    assert (loss_mod.max_m, loss_mod.s, loss_mod.diversity_factor) == (0.3, 16.0, -0.2)
    assert (loss_mod.diversity, loss_mod.individual, loss_mod.classification) == ("pairwise", False, "focal")
    assert (loss_mod.reweight, loss_mod.reweight_epoch, loss_mod.reweight_factor) == (False, 80, 0.02)
    assert (loss_mod.base_temperature, loss_mod.beta, loss_mod.focal_gamma, loss_mod.impl) == (2.0, 0.999, 2.0, "reference")


def test_ldam_drw_follows_reweight():
    assert build_loss(LossConfig(name="ldam", reweight_epoch=80), COUNTS).reweight_epoch == 80
    assert build_loss(LossConfig(name="ldam", reweight=False), COUNTS).reweight_epoch == -1


def test_distill_wrapping():
    assert isinstance(build_loss(LossConfig(), COUNTS, DistillConfig()), RIDELoss)  # no checkpoint: no wrap
    wrapped = build_loss(LossConfig(), COUNTS, DistillConfig(teacher_checkpoint="t.pth", temperature=2.0, scale_by_experts=False))
    assert isinstance(wrapped, RIDEDistillLoss) and isinstance(wrapped.base, RIDELoss)
    assert wrapped.temperature == 2.0 and wrapped.scale_by_experts is False


def test_unknown_name():
    with pytest.raises(ValueError, match=r"loss\.name: unknown name 'ldma' \(did you mean 'ldam'\?\).*'ride', 'ce', 'cb_ce', 'ldam', 'focal'"):
        build_loss(LossConfig(name="ldma"), COUNTS)  # the config refuses it before any loss is built
    with pytest.raises(TypeError, match="LossConfig"):
        build_loss({"name": "ride"}, COUNTS)


def test_zero_count_class_is_named():
    with pytest.raises(ValueError, match=r"\[1\] have zero training images"):
        build_loss(LossConfig(), [10, 0, 3])


def test_loss_path_asks_the_dispatch(monkeypatch):
    import importlib

    ops_ride_loss = importlib.import_module("ride_fast.ops.ride_loss")  # the module, not the function ride_fast.ops.ride_loss

    ride = build_loss(LossConfig(name="ride"), COUNTS)
    assert loss_path(ride, torch.device("cpu"), 3, len(COUNTS)) == "analytic"
    seen = []
    monkeypatch.setattr(ops_ride_loss, "ride_loss_path", lambda device, dtype, E, C: seen.append((torch.device(device).type, E, C)) or "triton")
    assert loss_path(ride, torch.device("cuda"), 3, len(COUNTS)) == "triton"
    assert seen == [("cuda", 3, len(COUNTS))]
    distilled = build_loss(LossConfig(name="ride"), COUNTS, DistillConfig(teacher_checkpoint="teacher.pt"))
    assert loss_path(distilled, torch.device("cuda"), 3, len(COUNTS)) == "triton"
    assert loss_path(build_loss(LossConfig(name="ride", impl="reference"), COUNTS), torch.device("cuda"), 3, 5) == "reference"
    assert loss_path(build_loss(LossConfig(name="focal"), COUNTS), torch.device("cuda"), 3, 5) == "reference"
