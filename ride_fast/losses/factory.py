"""Build a loss module from the `loss` (and `distill`) sections of the config.

Shape legend: C classes; class_counts [C] are the training images per class (counted from the
training list at run time).

    name    module
    ride    RIDELoss (every RIDE option of LossConfig)
    ce      CrossEntropyLoss
    cb_ce   ClassBalancedCELoss (beta)
    ldam    LDAMLoss (max_m, s; DRW at reweight_epoch when reweight, else never)
    focal   FocalLoss (focal_gamma; unweighted)

A non-empty `distill.teacher_checkpoint` wraps the result in `RIDEDistillLoss`.
"""
from __future__ import annotations

import difflib

import torch

from ride_fast.config import LOSS_NAMES, DistillConfig, LossConfig
from ride_fast.losses.classification import ClassBalancedCELoss, CrossEntropyLoss, ExpertLoss, FocalLoss, LDAMLoss
from ride_fast.losses.distill import RIDEDistillLoss
from ride_fast.losses.ride import RIDELoss
from ride_fast.losses.weights import ClassCounts


def build_loss(cfg: LossConfig, class_counts: ClassCounts, distill: DistillConfig | None = None) -> ExpertLoss:
    """The loss named by cfg.name, built for these class counts (wrapped for distillation if asked)."""
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"build_loss expects a LossConfig, got {type(cfg).__name__}")
    name = cfg.name
    if name == "ride":
        loss: ExpertLoss = RIDELoss(
            class_counts,
            max_m=cfg.max_m,
            s=cfg.s,
            diversity_factor=cfg.diversity_factor,
            reweight_epoch=cfg.reweight_epoch,
            reweight_factor=cfg.reweight_factor,
            base_temperature=cfg.base_temperature,
            diversity=cfg.diversity,
            individual=cfg.individual,
            zero_diversity_on_mean_logits=cfg.zero_diversity_on_mean_logits,
            classification=cfg.classification,
            reweight=cfg.reweight,
            beta=cfg.beta,
            focal_gamma=cfg.focal_gamma,
            impl=cfg.impl,
        )
    elif name == "ce":
        loss = CrossEntropyLoss(class_counts, impl=cfg.impl)
    elif name == "cb_ce":
        loss = ClassBalancedCELoss(class_counts, beta=cfg.beta, impl=cfg.impl)
    elif name == "ldam":
        loss = LDAMLoss(
            class_counts,
            max_m=cfg.max_m,
            s=cfg.s,
            reweight_epoch=cfg.reweight_epoch if cfg.reweight else -1,
            beta=cfg.beta,
            impl=cfg.impl,
        )
    elif name == "focal":
        loss = FocalLoss(class_counts, gamma=cfg.focal_gamma)
    else:
        close = difflib.get_close_matches(str(name), LOSS_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"loss.name: unknown loss {name!r}{hint}; valid names are {list(LOSS_NAMES)}")

    if distill is not None and distill.teacher_checkpoint:
        loss = RIDEDistillLoss(loss, temperature=distill.temperature, scale_by_experts=distill.scale_by_experts)
    return loss


__all__ = ["LOSS_NAMES", "build_loss"]


def loss_path(loss: ExpertLoss, device, num_experts: int, num_classes: int, dtype: torch.dtype = torch.float32) -> str:
    """Which implementation computes `loss` on `device`: "triton", "analytic" or "reference", as
    the loss itself decides it (`ExpertLoss.path`; a distillation wrapper reports its base loss).
    The cosine heads emit float32 logits under autocast too, hence the default dtype."""
    return loss.path(device, dtype, num_experts, num_classes)
