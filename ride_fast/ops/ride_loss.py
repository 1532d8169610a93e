"""The stage-1 RIDE loss as one differentiable function over all experts at once.

Shape legend: E experts, B images, C classes.

    expert_logits  [E, B, C]  s-scaled logits of every expert (float32, bfloat16 or float16)
    target         [B]        int64 class indices
    margins        [C]        s * m_c, subtracted from the target logit only (LDAM); None: plain CE
    class_weights  [C]        DRW class-balanced weights w_c; None: unweighted batch mean
    temperature    [C]        per-class diversity temperatures T_c (all T_base before the switch)

With z_k = expert_logits[k], zbar = mean_k z_k, q_k = softmax(z_k / T), pbar = softmax(zbar / T)
(pbar without gradient), Tm = mean_c T_c, lambda = diversity_factor:

    cls_k  = sum_i w_{y_i} * CE(z_k[i] - margins[y_i] * onehot(y_i), y_i) / sum_i w_{y_i}
    div_k  = lambda * Tm^2 * sum_i KL(pbar_i || q_k,i) / B                           ("mean")
           = lambda * Tm^2 / (E-1) * sum_i sum_{j!=k} KL(q_k,i || q_j,i) / B          ("pairwise")
    loss   = sum_k (cls_k + div_k)                     a sum over experts, not a mean

`individual=False` ("collaborative") replaces sum_k cls_k by the classification term of zbar.
Half-precision inputs (bfloat16, float16) are computed in float32; float32 stays float32 and
float64 stays float64 (so `torch.autograd.gradcheck` can check the reference).

`ride_loss(..., impl=...)` is the one place that chooses between this reference and the fused
Triton kernels (`ride_fast_kernels`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Impl = Literal["auto", "reference", "triton"]


def check_ride_loss_inputs(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None,
    class_weights: Tensor | None,
    temperature: Tensor | None,
    diversity: str,
) -> None:
    """Raise a clear error for inputs a user can get wrong (shapes, dtypes, modes)."""
    if expert_logits.dim() != 3:
        raise ValueError(f"expert_logits must be [E, B, C], got shape {tuple(expert_logits.shape)}")
    if not expert_logits.is_floating_point():
        raise TypeError(f"expert_logits must be floating point, got {expert_logits.dtype}")
    E, B, C = expert_logits.shape
    if E < 1 or B < 1 or C < 2:
        raise ValueError(f"expert_logits [E, B, C] needs E >= 1, B >= 1, C >= 2, got {(E, B, C)}")
    if target.shape != (B,):
        raise ValueError(f"target must have shape [B] = [{B}] to match expert_logits {tuple(expert_logits.shape)}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer class indices (int64), got {target.dtype}")
    for name, vec in (("margins", margins), ("class_weights", class_weights), ("temperature", temperature)):
        if vec is not None and vec.shape != (C,):
            raise ValueError(f"{name} must have shape [C] = [{C}], got {tuple(vec.shape)}")
    if diversity not in ("mean", "pairwise"):
        raise ValueError(f"diversity must be 'mean' or 'pairwise', got {diversity!r}")


def ride_loss_reference(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    individual: bool = True,
) -> Tensor:
    """Plain PyTorch RIDE loss (the specification). Returns a float32 scalar (float64 for float64
    logits); see module docstring.

    Memory traffic (elements of [E, B, C], read or written): margin subtraction 2, log-softmax 2,
    gather 1, tempered log-softmax 2, mean + tempered softmax 3, KL 3; the backward roughly doubles
    it. The fused kernel reads the logits once and writes their gradient once.
    """
    check_ride_loss_inputs(expert_logits, target, margins, class_weights, temperature, diversity)
    # bf16/fp16 -> float32; float32/float64 unchanged (a float64 input must not be rounded to
    # float32, or gradcheck of the reference measures rounding noise instead of the gradient).
    z = expert_logits.to(torch.promote_types(expert_logits.dtype, torch.float32))
    E, B, C = z.shape
    target = target.long()

    # ---- classification (LDAM or CE) term, weighted mean over the batch
    cls_logits = z if individual else z.mean(0, keepdim=True)  # [E', B, C]
    if margins is not None:
        onehot = F.one_hot(target, C).to(z.dtype)  # [B, C]
        cls_logits = cls_logits - (margins.to(z.dtype)[target].unsqueeze(-1) * onehot)
    log_p = torch.log_softmax(cls_logits, dim=-1)  # [E', B, C]
    nll = -log_p.gather(-1, target.view(1, B, 1).expand(log_p.shape[0], B, 1)).squeeze(-1)  # [E', B]
    if class_weights is not None:
        w = class_weights.to(z.dtype)[target]  # [B]
        cls = (nll * w).sum() / w.sum()
    else:
        cls = nll.mean(dim=1).sum()

    return cls + ride_diversity_reference(z, temperature, diversity_factor, temperature_mean, diversity)


def ride_diversity_reference(
    expert_logits: Tensor,
    temperature: Tensor | None,
    diversity_factor: float,
    temperature_mean: float,
    diversity: str = "mean",
) -> Tensor:
    """The diversity part of the RIDE loss alone, summed over experts (see the module docstring).

        "mean":     lambda * Tm^2 * sum_k sum_i KL(pbar_i || q_k,i) / B,  pbar without gradient
        "pairwise": lambda * Tm^2 / (E-1) * sum_k sum_i sum_{j!=k} KL(q_k,i || q_j,i) / B
                    using sum_{j!=k} KL(q_k||q_j) = sum_c q_kc (E log q_kc - sum_j log q_jc)

    Computed in float32 (float64 for float64 logits); zero when lambda is 0 or E = 1 in "pairwise".
    """
    z = expert_logits.to(torch.promote_types(expert_logits.dtype, torch.float32))
    E, B, C = z.shape
    if diversity_factor == 0.0 or (diversity == "pairwise" and E == 1):
        return z.new_zeros(())
    T = temperature.to(z.dtype) if temperature is not None else z.new_ones(C)
    log_q = torch.log_softmax(z / T, dim=-1)  # [E, B, C]
    if diversity == "mean":
        with torch.no_grad():
            log_pbar = torch.log_softmax(z.mean(0) / T, dim=-1)  # [B, C]
        kl = (log_pbar.exp() * (log_pbar - log_q)).sum()  # sum over experts, images, classes
    else:
        kl = (log_q.exp() * (E * log_q - log_q.sum(0, keepdim=True))).sum() / (E - 1)
    return diversity_factor * temperature_mean**2 * kl / B


def ride_loss(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    individual: bool = True,
    impl: Impl = "auto",
) -> Tensor:
    """The RIDE loss through the chosen implementation.

    impl: "reference" (plain PyTorch, any device), "triton" (fused kernels; CUDA, or CPU tensors
    under TRITON_INTERPRET=1), "auto" (Triton on CUDA when the fused kernel supports the call;
    elsewhere the reference's value with an analytic backward, `ride_loss_analytic`; the
    reference itself for individual=False).
    """
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    args = (expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity, individual)
    if impl == "reference" or (impl == "auto" and not individual):
        return ride_loss_reference(*args)
    if impl == "auto" and not _triton_usable(expert_logits, individual, margins, class_weights, temperature):
        return _ride_loss_analytic(*args)
    return _ride_loss_triton(*args)


def _constants_only(*vectors: Tensor | None) -> bool:
    """The fused paths treat margins / weights / temperatures as constants (no gradient)."""
    return not any(v is not None and v.requires_grad for v in vectors)


def _triton_usable(expert_logits: Tensor, individual: bool, *vectors: Tensor | None) -> bool:
    """Whether "auto" takes the fused Triton kernel: CUDA logits of a supported dtype and size."""
    if not (expert_logits.is_cuda and individual and _constants_only(*vectors)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    # the limits live in a torch-only module: reading them does not import triton
    from ride_fast_kernels._utils import MAX_CLASSES, MAX_EXPERTS, SUPPORTED_DTYPES

    E, _, C = expert_logits.shape if expert_logits.dim() == 3 else (0, 0, 0)
    return expert_logits.dtype in SUPPORTED_DTYPES and 1 <= E <= MAX_EXPERTS and 2 <= C <= MAX_CLASSES


def _ride_loss_analytic(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity, individual):
    """"auto" off the Triton path: the reference's value with a closed-form backward (faster on
    CPU than autograd of the reference); the reference itself when a vector needs a gradient."""
    if not _constants_only(margins, class_weights, temperature):
        return ride_loss_reference(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity, individual)
    check_ride_loss_inputs(expert_logits, target, margins, class_weights, temperature, diversity)
    from ride_fast.ops.ride_loss_analytic import ride_loss_analytic

    return ride_loss_analytic(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity)


def _ride_loss_triton(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity, individual):
    if not individual:
        raise ValueError("the fused Triton RIDE loss covers individual=True; use impl='reference' for the collaborative loss")
    check_ride_loss_inputs(expert_logits, target, margins, class_weights, temperature, diversity)
    from ride_fast_kernels.ride_loss import ride_loss_fused  # imports triton; only when asked for

    return ride_loss_fused(
        expert_logits,
        target,
        margins=margins,
        class_weights=class_weights,
        temperature=temperature,
        diversity_factor=diversity_factor,
        temperature_mean=temperature_mean,
        diversity=diversity,
    )
