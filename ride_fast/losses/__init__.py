"""Loss modules that own their class-count buffers and call `ride_fast.ops`.

Shape legend: E experts, B images, C classes. Every loss takes all experts at once,
`forward(expert_logits [E, B, C], target [B]) -> scalar` (the distillation wrapper also takes the
teacher's mean logits [B, C]), sums over experts, and has `set_epoch(epoch)` (epochs from 1).
"""
from ride_fast.losses.classification import (
    ClassBalancedCELoss,
    CrossEntropyLoss,
    ExpertLoss,
    FocalLoss,
    LDAMLoss,
    check_logits_and_target,
    focal_term,
)
from ride_fast.losses.distill import RIDEDistillLoss, distill_kl
from ride_fast.losses.factory import LOSS_NAMES, build_loss, loss_path
from ride_fast.losses.ride import RIDELoss, diversity_term
from ride_fast.losses.weights import (
    class_balanced_weights,
    diversity_temperatures,
    ldam_margins,
    validate_class_counts,
)

__all__ = [
    "LOSS_NAMES",
    "ClassBalancedCELoss",
    "CrossEntropyLoss",
    "ExpertLoss",
    "FocalLoss",
    "LDAMLoss",
    "RIDEDistillLoss",
    "RIDELoss",
    "build_loss",
    "check_logits_and_target",
    "class_balanced_weights",
    "distill_kl",
    "diversity_term",
    "diversity_temperatures",
    "focal_term",
    "ldam_margins",
    "loss_path",
    "validate_class_counts",
]
