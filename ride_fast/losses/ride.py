"""The stage-1 RIDE loss module (docs/method.md §3): per-expert LDAM-DRW + diversity, summed over experts.

Shape legend: E experts, B images, C classes.

    expert_logits  [E, B, C]  s-scaled logits of every expert
    target         [B]        int64 class indices
    margins        [C]        s * m_c, m_c = max_m * n_c^(-1/4) / max n^(-1/4)
    drw_weights    [C]        class-balanced weights, sum C
    temperature    [C]        diversity temperatures in use now

With z_k = expert_logits[k], zbar = mean_k z_k, q_k = softmax(z_k / T), pbar = softmax(zbar / T)
(no gradient), lambda = diversity_factor:

    loss = sum_k [ cls_k + lambda * Tm^2 * KL(pbar || q_k) / B ]                  ("mean")
    loss = sum_k [ cls_k + lambda * Tm^2 / (E-1) * sum_{j!=k} KL(q_k || q_j) / B ]  ("pairwise")

Two phases, switched by `set_epoch` (epochs from 1):

    epoch <= reweight_epoch   cls_k unweighted,  T_c = T_base,        Tm = T_base
    epoch >  reweight_epoch   cls_k DRW-weighted, T_c = T_base * t_c,  Tm = mean_c T_c

(reweight=False or reweight_epoch=-1: the first phase forever, as in the original code.)

zero_diversity_on_mean_logits with lambda == 0 exactly: what the original code does then, every
expert's classification term on zbar instead of z_k, so loss = E * cls(zbar) (docs/method.md §10).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ride_fast.losses.classification import (
    ExpertLoss,
    check_impl,
    check_reweight_epoch,
    focal_term,
)
from ride_fast.losses.weights import ClassCounts, class_balanced_weights, diversity_temperatures, ldam_margins
from ride_fast.ops.ride_loss import _ride_loss_checked, call_path, ride_diversity_reference

CLASSIFICATIONS = ("ldam", "ce", "focal")
DIVERSITIES = ("mean", "pairwise")


# The diversity part alone (used with the focal classification term, which the op does not cover).
diversity_term = ride_diversity_reference


class RIDELoss(ExpertLoss):
    """RIDE stage-1 loss over all experts at once; see the module docstring for the math.

    Args:
        class_counts: training images per class, [C].
        max_m, s: LDAM largest margin and the cosine scale (margins passed to the op are s * m_c).
        diversity_factor: lambda (negative: the KL is maximised).
        reweight_epoch: the switch happens at epoch > reweight_epoch; -1: never.
        reweight_factor: gamma of the distribution-aware temperatures.
        base_temperature: T_base.
        diversity: "mean" (original code) or "pairwise" (paper formula).
        individual: True: classification loss per expert; False ("collaborative"): on mean logits.
        zero_diversity_on_mean_logits: True: when diversity_factor == 0 exactly, the original code's
            loss, E copies of the classification term on the mean logits (E * cls(zbar)).
        classification: "ldam" (margins), "ce" (no margins) or "focal" (no margins, focal_gamma).
            In the second phase every one of them is DRW-weighted.
        reweight: False keeps the first phase forever.
        beta: class-balanced weight beta.
        impl: "auto" | "reference" | "triton", passed to `ride_fast.ops.ride_loss` (ldam and ce).

    Inspect: `margins` (None unless ldam), `drw_weights`, `class_weights` / `temperature` /
    `temperature_mean` (what the op receives now), `phase` (0 or 1).
    """

    margins: Tensor | None
    drw_weights: Tensor
    temperature_base: Tensor
    temperature_drw: Tensor

    def __init__(
        self,
        class_counts: ClassCounts,
        max_m: float = 0.5,
        s: float = 30.0,
        diversity_factor: float = -0.45,
        reweight_epoch: int = 160,
        reweight_factor: float = 0.05,
        base_temperature: float = 1.0,
        diversity: str = "mean",
        individual: bool = True,
        zero_diversity_on_mean_logits: bool = False,
        classification: str = "ldam",
        reweight: bool = True,
        beta: float = 0.9999,
        focal_gamma: float = 1.0,
        impl: str = "auto",
    ) -> None:
        super().__init__(class_counts)
        if classification not in CLASSIFICATIONS:
            raise ValueError(f"classification must be one of {list(CLASSIFICATIONS)}, got {classification!r}")
        if diversity not in DIVERSITIES:
            raise ValueError(f"diversity must be one of {list(DIVERSITIES)}, got {diversity!r}")
        if not s > 0:
            raise ValueError(f"s must be > 0, got {s}")
        if not base_temperature > 0:
            raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
        if not focal_gamma >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.max_m, self.s, self.beta = float(max_m), float(s), float(beta)
        self.diversity_factor = float(diversity_factor)
        self.reweight_epoch = check_reweight_epoch(reweight_epoch)
        self.reweight_factor = float(reweight_factor)
        self.base_temperature = float(base_temperature)
        self.diversity = diversity
        self.individual = bool(individual)
        self.zero_diversity_on_mean_logits = bool(zero_diversity_on_mean_logits)
        # the original's lambda == 0: sum over the E experts of the classification term of zbar
        self._mean_copies = self.zero_diversity_on_mean_logits and self.diversity_factor == 0.0
        self.classification = classification
        self.reweight = bool(reweight)
        self.focal_gamma = float(focal_gamma)
        self.impl = check_impl(impl)

        counts = self.class_counts
        C = self.num_classes
        margins = ldam_margins(counts, max_m) * s if classification == "ldam" else None
        t = diversity_temperatures(counts, reweight_factor) * self.base_temperature  # float64, host
        self._buffer("margins", margins)
        self._buffer("drw_weights", class_balanced_weights(counts, beta))
        self._buffer("temperature_base", torch.full((C,), self.base_temperature, dtype=torch.float64))
        self._buffer("temperature_drw", t)
        # Tm of each phase, host floats computed once in float64: never a device read in forward.
        self._temperature_mean = (self.base_temperature, float(t.mean()))
        self._phase = 0
        # first phase with T_base = 1: every temperature is 1, which the op takes as None (the
        # fused kernel then shares one exponential between the classification and diversity terms)
        self._uniform_one = self.base_temperature == 1.0
        self.set_epoch(1)

    # ---- schedule

    def set_epoch(self, epoch: int) -> None:
        """Pick the phase for this epoch: 1 when reweighting is on and epoch > reweight_epoch."""
        super().set_epoch(epoch)
        switch = self.reweight and self.reweight_epoch != -1
        self._phase = int(switch and epoch > self.reweight_epoch)

    @property
    def phase(self) -> int:
        return self._phase

    @property
    def class_weights(self) -> Tensor | None:
        """Class weights of the classification term now: None (plain mean) before the switch."""
        return self.drw_weights if self._phase == 1 else None

    @property
    def temperature(self) -> Tensor:
        """Diversity temperatures T_c now, [C]: all T_base before the switch, T_base * t_c after."""
        return self.temperature_drw if self._phase == 1 else self.temperature_base

    @property
    def temperature_mean(self) -> float:
        """Tm = mean_c T_c now (a host float)."""
        return self._temperature_mean[self._phase]

    @property
    def per_expert_terms(self) -> bool:
        """Whether the classification term is computed per expert (False: on the mean logits, the
        path the fused kernel and the analytic gradient do not cover)."""
        return self.individual and not self._mean_copies

    def path(self, device: torch.device | str, dtype: torch.dtype = torch.float32, num_experts: int | None = None,
             num_classes: int | None = None) -> str:
        """Which implementation `forward` runs now (see `ExpertLoss.path`): the focal
        classification term and the mean-logit (collaborative) term are plain PyTorch."""
        if self.classification == "focal":
            return "reference"
        return call_path(self.impl, device, dtype, num_experts, self.num_classes or num_classes, self.per_expert_terms)

    # ---- loss

    def forward(self, expert_logits: Tensor, target: Tensor, weight_sum: Tensor | None = None) -> Tensor:
        self._check(expert_logits, target)
        copies = expert_logits.shape[0] if self._mean_copies else 1  # lambda == 0: the diversity term is zero
        if self.classification == "focal":
            cls_logits = expert_logits if self.per_expert_terms else expert_logits.mean(0, keepdim=True)
            cls = focal_term(cls_logits, target, self.focal_gamma, self.class_weights, weight_sum)
            div = diversity_term(
                expert_logits, self.temperature, self.diversity_factor, self.temperature_mean, self.diversity
            )
            return cls * copies + div
        # validated above: the op is called without a second check
        loss = _ride_loss_checked(
            expert_logits,
            target,
            margins=self.margins,
            class_weights=self.class_weights,
            temperature=self.temperature if self._uniform_one is False or self._phase == 1 else None,
            diversity_factor=self.diversity_factor,
            temperature_mean=self.temperature_mean,
            diversity=self.diversity,
            individual=self.per_expert_terms,
            impl=self.impl,
            weight_sum=weight_sum,
        )
        return loss * copies if copies != 1 else loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, classification={self.classification!r}, "
            f"diversity={self.diversity!r}, diversity_factor={self.diversity_factor}, "
            f"individual={self.individual}, zero_diversity_on_mean_logits={self.zero_diversity_on_mean_logits}, "
            f"reweight={self.reweight}, reweight_epoch={self.reweight_epoch}, "
            f"reweight_factor={self.reweight_factor}, base_temperature={self.base_temperature}, "
            f"max_m={self.max_m}, s={self.s}, phase={self.phase}"
        )


__all__ = ["RIDELoss", "diversity_term"]
