"""Per-expert classification losses (baselines and the pieces of the RIDE loss).

Shape legend: E experts, B images, C classes.

    expert_logits  [E, B, C]  s-scaled logits of every expert (E = 1 for a single-head baseline)
    target         [B]        int64 (or int32) class indices in [0, C)
    class_counts   [C]        training images per class

Every loss here is an `ExpertLoss`: `forward(expert_logits, target)` returns a scalar, the **sum**
over experts of each expert's loss (so E = 1 is the ordinary loss), computed in one vectorised pass
over all experts in float32 (float64 stays float64); `set_epoch(epoch)` is called by the trainer at
the start of every epoch (epochs counted from 1). Class-count derived tensors are non-persistent
buffers: `.to(device)` moves them, the state dict does not carry them (they are rebuilt from the
counts).

    CE        cls_k = mean_i -log softmax(z_k[i])_{y_i}
    weighted  cls_k = sum_i w_{y_i} l_ki / sum_i w_{y_i}                       (class-balanced, DRW)
    LDAM      l_ki  = CE(z_k[i] - s m_{y_i} onehot(y_i), y_i)
    focal     l_ki  = (1 - p_ki)^gamma * (-log p_ki),  p_ki = softmax(z_k[i])_{y_i}
"""
from __future__ import annotations

import os
from collections.abc import Hashable

import torch
from torch import Tensor, nn

from ride_fast.losses.weights import (
    ClassCounts,
    class_balanced_weights,
    ldam_margins,
    validate_class_counts,
)
from ride_fast.ops.ride_loss import _ride_loss_checked, call_path, weighted_batch_mean

IMPLS = ("auto", "reference", "triton")


def debug_checks_enabled() -> bool:
    """True when RIDE_FAST_DEBUG is set to something other than '' or '0' (checks that sync the device)."""
    return os.environ.get("RIDE_FAST_DEBUG", "") not in ("", "0")


def range_check_reads_host(device: torch.device) -> bool:
    """Whether `check_logits_and_target` reads the target range back to the host on `device`:
    always on the CPU (free), on an accelerator only under RIDE_FAST_DEBUG=1 (a device sync), never
    on the meta device (nothing to read)."""
    return device.type == "cpu" or (device.type != "meta" and debug_checks_enabled())


def check_logits_and_target(expert_logits: Tensor, target: Tensor, num_classes: int | None = None,
                            check_range: bool = True) -> None:
    """Raise a clear error for logits/targets a user can get wrong.

    Shapes, dtypes and devices are always checked (host metadata, free). The range 0 <= y < C
    (`check_target_range`, unless check_range=False: a caller whose next step checks it) is
    checked when the target lives on the CPU (cheap) or when RIDE_FAST_DEBUG=1; on an accelerator
    without debug it is skipped, because reading the result would force a host sync.
    """
    if not isinstance(expert_logits, Tensor):
        raise TypeError(f"expert_logits must be a Tensor [E, B, C], got {type(expert_logits).__name__}")
    if expert_logits.dim() != 3:
        hint = " (a single head's [B, C] logits: pass logits.unsqueeze(0))" if expert_logits.dim() == 2 else ""
        raise ValueError(f"expert_logits must be [E, B, C], got shape {tuple(expert_logits.shape)}{hint}")
    if not expert_logits.is_floating_point():
        raise TypeError(f"expert_logits must be floating point, got {expert_logits.dtype}")
    E, B, C = expert_logits.shape
    if E < 1 or B < 1 or C < 2:
        raise ValueError(f"expert_logits [E, B, C] needs E >= 1, B >= 1, C >= 2, got {(E, B, C)}")
    if num_classes is not None and C != num_classes:
        raise ValueError(
            f"expert_logits have C = {C} classes but the loss was built for {num_classes} "
            f"(len(class_counts)); the model's num_classes and the data set disagree"
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor [B] of class indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"target must hold integer class indices (int64), got {target.dtype}; "
            "soft or one-hot targets are not supported (use target.long() for index tensors)"
        )
    if target.shape != (B,):
        raise ValueError(
            f"target must have shape [B] = [{B}] to match expert_logits {tuple(expert_logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != expert_logits.device:
        raise ValueError(f"target is on {target.device} but expert_logits are on {expert_logits.device}")
    if check_range:
        check_target_range(target, C)


def check_target_range(target: Tensor, C: int) -> None:
    """0 <= target < C, where reading the answer costs nothing (see `check_logits_and_target`)."""
    if torch.compiler.is_compiling():
        return  # no host read inside a compiled graph; the CPU op checks the range itself
    if range_check_reads_host(target.device):
        bad = (target < 0) | (target >= C)
        if bool(bad.any()):  # host read: CPU tensors, or an accelerator under RIDE_FAST_DEBUG=1
            values = torch.unique(target[bad])[:10].tolist()
            raise ValueError(f"target holds class index(es) {values} outside [0, C) with C = {C}")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    return impl


def check_reweight_epoch(reweight_epoch: int) -> int:
    if isinstance(reweight_epoch, bool) or not isinstance(reweight_epoch, int) or reweight_epoch < -1:
        raise ValueError(f"reweight_epoch must be an integer >= 0, or -1 for never, got {reweight_epoch!r}")
    return reweight_epoch


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def focal_term(logits: Tensor, target: Tensor, gamma: float, class_weights: Tensor | None = None,
               weight_sum: Tensor | None = None) -> Tensor:
    """Sum over the leading (expert) axis of the per-expert focal loss; logits [E', B, C] -> scalar.

        FL_ki = (1 - p_ki)^gamma * (-log p_ki),  p_ki = softmax(z_k[i])_{y_i}
        loss  = sum_k sum_i w_{y_i} FL_ki / W,  W = sum_i w_{y_i}  (w = 1: the plain batch mean)

    gamma = 0 is cross-entropy exactly. The class weight multiplies the whole focal term (Cui et
    al. 2019) and the batch mean is normalised by sum w, like `F.cross_entropy(weight=...)`;
    weight_sum replaces W (the whole batch's sum, when this call sees part of it).
    """
    z = logits.to(compute_dtype(logits))
    Ep, B, _ = z.shape
    log_p = torch.log_softmax(z, dim=-1)
    log_py = log_p.gather(-1, target.long().view(1, B, 1).expand(Ep, B, 1)).squeeze(-1)  # [E', B]
    loss = -log_py
    if gamma != 0:
        # 1 - p = -expm1(log p): accurate when p is close to 1; clamp guards log p rounding above 0
        loss = (-torch.expm1(log_py)).clamp_min(0).pow(gamma) * loss
    return weighted_batch_mean(loss, target, class_weights, weight_sum)


class ExpertLoss(nn.Module):
    """Base of the losses: forward(expert_logits [E, B, C], target [B], weight_sum=None) -> scalar;
    set_epoch(epoch).

    weight_sum: the divisor of the classification term's (weighted) batch mean, for a call that
    sees part of a batch: `class_weight_sum` of the whole batch's targets, which the training step
    sums over its micro-batches and ranks (docs/method.md §8). None: this call's own targets.
    """

    num_classes: int | None

    def __init__(self, class_counts: ClassCounts | None = None) -> None:
        super().__init__()
        self.class_counts = None if class_counts is None else validate_class_counts(class_counts)
        self.num_classes = None if self.class_counts is None else int(self.class_counts.shape[0])
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch (epochs counted from 1). No-op without a schedule."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        self.epoch = epoch

    def graph_key(self) -> Hashable:
        """The Python state that `set_epoch` hands to forward: a captured training step replays
        only while it is unchanged (engine/step_graph.py). A loss with deferred re-weighting
        branches on its `phase`; one without a schedule on nothing (None)."""
        return getattr(self, "phase", None)

    def class_weight_sum(self, target: Tensor) -> Tensor | None:
        """sum_i w_{y_i} of the classification term's current class weights over `target` (a float64
        scalar on its device: the loss divides by it in its own precision), or None for a plain
        batch mean (no weights now)."""
        weights = getattr(self, "class_weights", None)
        return None if weights is None else weights[target.long()].double().sum()

    def _buffer(self, name: str, value: Tensor | None) -> None:
        """Register a float32 class-count buffer (non-persistent: rebuilt from the counts)."""
        self.register_buffer(name, None if value is None else value.to(torch.float32), persistent=False)

    def _check(self, expert_logits: Tensor, target: Tensor) -> None:
        """`check_logits_and_target` with one scan of the target range a call: left to the RIDE loss
        operator where it checks the range itself (its closed-form path, on the CPU)."""
        check_logits_and_target(expert_logits, target, self.num_classes, check_range=False)
        E, _, C = expert_logits.shape
        if not (expert_logits.device.type == "cpu" and self.path(expert_logits.device, expert_logits.dtype, E, C) == "analytic"):
            check_target_range(target, C)

    def path(self, device: torch.device | str, dtype: torch.dtype = torch.float32, num_experts: int | None = None,
             num_classes: int | None = None) -> str:
        """Which implementation `forward` runs for [num_experts, B, C] logits of `dtype` on `device`:
        "triton", "analytic" or "reference" (`ride_fast.ops.call_path`: the decision the RIDE loss
        operator takes). Losses without `impl` are plain PyTorch: "reference"."""
        impl = getattr(self, "impl", None)
        if impl is None:
            return "reference"
        return call_path(impl, device, dtype, num_experts, self.num_classes or num_classes)


class CrossEntropyLoss(ExpertLoss):
    """Plain cross-entropy: sum over experts of each expert's batch-mean CE (E = 1: the CE baseline).

    class_counts is optional; when given, the number of classes of the logits is checked against it.
    """

    def __init__(self, class_counts: ClassCounts | None = None, impl: str = "auto") -> None:
        super().__init__(class_counts)
        self.impl = check_impl(impl)

    def forward(self, expert_logits: Tensor, target: Tensor, weight_sum: Tensor | None = None) -> Tensor:
        self._check(expert_logits, target)
        return _ride_loss_checked(expert_logits, target, impl=self.impl, weight_sum=weight_sum)


class ClassBalancedCELoss(ExpertLoss):
    """Class-balanced CE (Cui et al. 2019): per expert sum_i w_{y_i} l_i / sum_i w_{y_i}, summed over experts.

    w_c = (1 - beta) / (1 - beta^n_c), normalised to sum C (`class_balanced_weights`), from epoch 1.
    """

    class_weights: Tensor

    def __init__(self, class_counts: ClassCounts, beta: float = 0.9999, impl: str = "auto") -> None:
        super().__init__(class_counts)
        self.beta = float(beta)
        self.impl = check_impl(impl)
        self._buffer("class_weights", class_balanced_weights(self.class_counts, beta))

    def forward(self, expert_logits: Tensor, target: Tensor, weight_sum: Tensor | None = None) -> Tensor:
        self._check(expert_logits, target)
        return _ride_loss_checked(expert_logits, target, class_weights=self.class_weights, impl=self.impl, weight_sum=weight_sum)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, beta={self.beta}"


class LDAMLoss(ExpertLoss):
    """LDAM (Cao et al. 2019), optionally with deferred re-weighting (LDAM-DRW).

    Per expert: CE(z - s m_y onehot(y), y), a plain batch mean up to `reweight_epoch` and the
    class-balanced weighted mean after it (epoch > reweight_epoch); reweight_epoch = -1: never
    re-weight. Summed over experts.

    Attributes: `margins` [C] = s * m_c (logit units, what the op subtracts), `drw_weights` [C],
    `class_weights` (the weights in use now: None before the switch), `phase` (0 or 1).
    """

    margins: Tensor
    drw_weights: Tensor

    def __init__(
        self,
        class_counts: ClassCounts,
        max_m: float = 0.5,
        s: float = 30.0,
        reweight_epoch: int = -1,
        beta: float = 0.9999,
        impl: str = "auto",
    ) -> None:
        super().__init__(class_counts)
        if not s > 0:
            raise ValueError(f"s must be > 0, got {s}")
        self.max_m, self.s, self.beta = float(max_m), float(s), float(beta)
        self.reweight_epoch = check_reweight_epoch(reweight_epoch)
        self.impl = check_impl(impl)
        self._buffer("margins", ldam_margins(self.class_counts, max_m) * s)
        self._buffer("drw_weights", class_balanced_weights(self.class_counts, beta))

    @property
    def phase(self) -> int:
        return int(self.reweight_epoch != -1 and self.epoch > self.reweight_epoch)

    @property
    def class_weights(self) -> Tensor | None:
        return self.drw_weights if self.phase == 1 else None

    def forward(self, expert_logits: Tensor, target: Tensor, weight_sum: Tensor | None = None) -> Tensor:
        self._check(expert_logits, target)
        return _ride_loss_checked(expert_logits, target, margins=self.margins, class_weights=self.class_weights, impl=self.impl,
                                  weight_sum=weight_sum)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, "
            f"reweight_epoch={self.reweight_epoch}, beta={self.beta}, phase={self.phase}"
        )


class FocalLoss(ExpertLoss):
    """Focal loss (Lin et al. 2017), summed over experts; see `focal_term`.

    class_balanced=True weights each image by the class-balanced weight of its class (needs
    class_counts). gamma = 0 is CE.
    """

    class_weights: Tensor | None

    def __init__(
        self,
        class_counts: ClassCounts | None = None,
        gamma: float = 1.0,
        class_balanced: bool = False,
        beta: float = 0.9999,
    ) -> None:
        super().__init__(class_counts)
        if not gamma >= 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if class_balanced and class_counts is None:
            raise ValueError("FocalLoss(class_balanced=True) needs class_counts")
        self.gamma, self.class_balanced, self.beta = float(gamma), bool(class_balanced), float(beta)
        self._buffer("class_weights", class_balanced_weights(self.class_counts, beta) if class_balanced else None)

    def forward(self, expert_logits: Tensor, target: Tensor, weight_sum: Tensor | None = None) -> Tensor:
        check_logits_and_target(expert_logits, target, self.num_classes)
        return focal_term(expert_logits, target, self.gamma, self.class_weights, weight_sum)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, class_balanced={self.class_balanced}"


__all__ = [
    "ClassBalancedCELoss",
    "CrossEntropyLoss",
    "ExpertLoss",
    "FocalLoss",
    "LDAMLoss",
    "check_logits_and_target",
    "focal_term",
]
