"""The stage-1 RIDE loss as one differentiable function over all experts at once.

Shape legend: E experts, B images, C classes.

    expert_logits  [E, B, C]  s-scaled logits of every expert (float32, bfloat16 or float16)
    target         [B]        int64 class indices
    margins        [C]        s * m_c, subtracted from the target logit only (LDAM); None: plain CE
    class_weights  [C]        DRW class-balanced weights w_c; None: unweighted batch mean
    temperature    [C]        per-class diversity temperatures T_c (all T_base before the switch)
    weight_sum     []         optional divisor of the classification term: sum_i w_{y_i} over the whole
                              batch when this call sees only part of it (one rank, one micro-batch)

With z_k = expert_logits[k], zbar = mean_k z_k, q_k = softmax(z_k / T), pbar = softmax(zbar / T)
(pbar without gradient), Tm = mean_c T_c, lambda = diversity_factor:

    cls_k  = sum_i w_{y_i} * CE(z_k[i] - margins[y_i] * onehot(y_i), y_i) / W,   W = sum_i w_{y_i}
    div_k  = lambda * Tm^2 * sum_i KL(pbar_i || q_k,i) / B                           ("mean")
           = lambda * Tm^2 / (E-1) * sum_i sum_{j!=k} KL(q_k,i || q_j,i) / B          ("pairwise")
    loss   = sum_k (cls_k + div_k)                     a sum over experts, not a mean

`individual=False` ("collaborative") replaces sum_k cls_k by the classification term of zbar.
W is `weight_sum` when given (w = 1 without class weights: W = B), so that the parts of a batch
split over ranks or micro-batches add up to the weighted mean of the whole batch (docs/method.md §8).
Half-precision inputs (bfloat16, float16) are computed in float32; float32 stays float32 and
float64 stays float64 (so `torch.autograd.gradcheck` can check the reference).

`ride_loss(..., impl=...)` is the one place that chooses between this reference, the analytic
path and the fused Triton kernels (`ride_fast_kernels`); `ride_loss_path` says which "auto" takes.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ride_fast.ops.ride_loss_analytic import _host_reads_are_free, _ride_loss_and_grad
from ride_fast.ops.ride_loss_design import _TRITON_INSTALLED, _eager, declared_grad_scale, fused_loss_design

Impl = Literal["auto", "reference", "triton"]


def check_ride_loss_inputs(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None,
    class_weights: Tensor | None,
    temperature: Tensor | None,
    diversity: str,
    weight_sum: Tensor | None = None,
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
    if target.device != expert_logits.device:
        raise ValueError(f"target is on {target.device} but expert_logits are on {expert_logits.device}")
    for name, vec in (("margins", margins), ("class_weights", class_weights), ("temperature", temperature)):
        if vec is not None and vec.shape != (C,):
            raise ValueError(f"{name} must have shape [C] = [{C}], got {tuple(vec.shape)}")
        if vec is not None and vec.device != expert_logits.device:
            raise ValueError(f"{name} is on {vec.device} but expert_logits are on {expert_logits.device}; move it with .to(logits.device)")
    if diversity not in ("mean", "pairwise"):
        raise ValueError(f"diversity must be 'mean' or 'pairwise', got {diversity!r}")
    if weight_sum is not None:
        if weight_sum.numel() != 1 or not weight_sum.is_floating_point():
            raise ValueError(f"weight_sum must be a one-element floating-point tensor, got shape {tuple(weight_sum.shape)} {weight_sum.dtype}")
        if weight_sum.device != expert_logits.device:
            raise ValueError(f"weight_sum is on {weight_sum.device} but expert_logits are on {expert_logits.device}")


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
    weight_sum: Tensor | None = None,
) -> Tensor:
    """Plain PyTorch RIDE loss (the specification). Returns a float32 scalar (float64 for float64
    logits); see module docstring.

    Memory traffic (elements of [E, B, C], read or written): margin subtraction 2, log-softmax 2,
    gather 1, tempered log-softmax 2, mean + tempered softmax 3, KL 3; the backward roughly doubles
    it. The fused kernel reads the logits once and writes their gradient once.
    """
    check_ride_loss_inputs(expert_logits, target, margins, class_weights, temperature, diversity, weight_sum)
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
    cls = weighted_batch_mean(nll, target, class_weights, weight_sum)

    return cls + ride_diversity_reference(z, temperature, diversity_factor, temperature_mean, diversity)


def weighted_batch_mean(values: Tensor, target: Tensor, class_weights: Tensor | None,
                        weight_sum: Tensor | None = None) -> Tensor:
    """sum_k sum_i w_{y_i} values[k, i] / W for values [E', B]: the classification terms' batch mean,
    W = sum_i w_{y_i} (w = 1 without class weights: the plain mean) or `weight_sum` when given."""
    divisor = None if weight_sum is None else weight_sum.to(values.dtype).reshape(())
    if class_weights is None:
        return values.mean(dim=1).sum() if divisor is None else values.sum() / divisor
    w = class_weights.to(values.dtype)[target.long()]  # [B]
    return (values * w).sum() / (w.sum() if divisor is None else divisor)


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


# --------------------------------------------------------------------------- dispatch

if _TRITON_INSTALLED:  # a torch-only module: reading the kernels' limits does not import triton
    from ride_fast_kernels._utils import MAX_CLASSES, MAX_EXPERTS, SUPPORTED_DTYPES, check_logits
Path = Literal["triton", "analytic", "reference"]


def ride_loss_path(
    device: torch.device | str,
    dtype: torch.dtype,
    num_experts: int | None = None,
    num_classes: int | None = None,
    individual: bool = True,
) -> Path:
    """The implementation `ride_loss(impl="auto")` takes for logits on `device` of `dtype`:

    "triton"     the fused kernels (CUDA, Triton installed, a supported dtype and size)
    "analytic"   the closed-form gradient in plain PyTorch (`ride_fast.ops.ride_loss_analytic`)
    "reference"  autograd of `ride_loss_reference` (individual=False, the collaborative loss)

    Pure host logic (no tensor is touched): a trainer can ask it before building anything.
    """
    if not individual:
        return "reference"
    if torch.device(device).type == "cuda" and _TRITON_INSTALLED:
        fits = (num_experts is None or 1 <= num_experts <= MAX_EXPERTS) and (num_classes is None or 2 <= num_classes <= MAX_CLASSES)
        if dtype in SUPPORTED_DTYPES and fits:
            return "triton"
    return "analytic"


def call_path(
    impl: str,
    device: torch.device | str,
    dtype: torch.dtype,
    num_experts: int | None = None,
    num_classes: int | None = None,
    individual: bool = True,
    constants: bool = True,
) -> Path:
    """The implementation a call of `ride_loss(..., impl=impl)` runs: the reference for
    impl="reference", for the collaborative loss (individual=False) and for per-class vectors that
    need a gradient (constants=False); the kernels for impl="triton"; `ride_loss_path` for "auto".
    The one decision `ride_loss` takes and loss modules report (`ExpertLoss.path`)."""
    if impl == "reference" or not individual or not constants:
        return "reference"
    if impl == "triton":
        return "triton"
    return ride_loss_path(device, dtype, num_experts, num_classes)


# --------------------------------------------------------------------------- the registered operator
#
# torch.ops.ride_fast.ride_loss returns (loss, saved, aux, written): the last three are what the
# backward needs and carry no gradient. The Triton path keeps per-row statistics ([B, 3, E]) and
# the weight sum ([1]); its backward kernel reads grad_output from device memory and writes the
# scaled gradient once. With `grad_in_forward` its forward has written the gradient for
# grad_output = grad_scale already (`written`, [E, B, C]; grad_scale is 1 unless the caller
# declared the factor it multiplies the loss by, `scaled_before_backward`), which the backward
# hands over, recomputed in place first where grad_output is another number (a device-side
# test). The analytic path computes the
# gradient in the forward and keeps it ([E, B, C]; float32 for float16 logits, so that it is
# rounded only after scaling); its backward multiplies by grad_output. One op, one fake
# implementation, one autograd formula for all three.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """The analytic path keeps float16 gradients in float32: scaled first, rounded once."""
    return torch.float32 if dtype == torch.float16 else dtype


@torch.library.custom_op("ride_fast::ride_loss", mutates_args=())
def _ride_loss_op(
    expert_logits: Tensor,
    target: Tensor,
    margins: Optional[Tensor],
    class_weights: Optional[Tensor],
    temperature: Optional[Tensor],
    diversity_factor: float,
    temperature_mean: float,
    diversity: str,
    use_triton: bool,
    need_grad: bool,
    weight_sum: Optional[Tensor] = None,
    grad_in_forward: bool = False,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    empty = expert_logits.new_empty(0)
    if use_triton:
        from ride_fast_kernels.ride_loss import _forward, _prepare  # imports triton; only on this path

        args = _prepare(expert_logits, target, margins, class_weights, temperature)
        written = torch.empty(expert_logits.shape, dtype=expert_logits.dtype, device=expert_logits.device) if grad_in_forward else None
        loss, stats, aux = _forward(*args, diversity_factor, temperature_mean, diversity, weight_sum=weight_sum, grad_out=written,
                                    grad_scale=grad_scale)
        return loss, stats, aux, empty.clone() if written is None else written
    C = expert_logits.shape[2]
    bad = None
    if _host_reads_are_free(target):  # the CPU; inside the op, so it holds under torch.compile too
        _check_target_range(target, C)
    else:  # no host read: a target out of range poisons the loss with NaN, as the kernels do
        bad = ((target < 0) | (target >= C)).any()
        target = target.clamp(0, C - 1)
    if not need_grad:
        with torch.no_grad():
            loss = ride_loss_reference(expert_logits, target, margins, class_weights, temperature, diversity_factor,
                                       temperature_mean, diversity, weight_sum=weight_sum)
        return _poisoned(loss, bad), empty, empty.clone(), empty.clone()
    loss, grad = _ride_loss_and_grad(expert_logits, target, margins, class_weights, temperature, diversity_factor,
                                     temperature_mean, diversity, weight_sum)
    return _poisoned(loss, bad), grad.to(_saved_dtype(expert_logits.dtype)), empty, empty.clone()


def _poisoned(loss: Tensor, bad: Tensor | None) -> Tensor:
    return loss if bad is None else torch.where(bad, float("nan"), loss)


@_ride_loss_op.register_fake
def _(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity, use_triton, need_grad,
      weight_sum=None, grad_in_forward=False, grad_scale=1.0):
    E, B, C = expert_logits.shape
    dtype = expert_logits.dtype
    loss = expert_logits.new_empty((), dtype=_compute_dtype(dtype))
    if use_triton:
        written = expert_logits.new_empty((E, B, C)) if grad_in_forward else expert_logits.new_empty(0)
        return loss, expert_logits.new_empty((B, 3, E), dtype=torch.float32), expert_logits.new_empty(1, dtype=torch.float32), written
    saved = expert_logits.new_empty((E, B, C), dtype=_saved_dtype(dtype)) if need_grad else expert_logits.new_empty(0)
    return loss, saved, expert_logits.new_empty(0), expert_logits.new_empty(0)


@torch.library.custom_op("ride_fast::ride_loss_backward", mutates_args=())
def _ride_loss_backward_op(
    grad_output: Tensor,
    expert_logits: Tensor,
    target: Tensor,
    margins: Optional[Tensor],
    class_weights: Optional[Tensor],
    temperature: Optional[Tensor],
    saved: Tensor,
    aux: Tensor,
    diversity_factor: float,
    temperature_mean: float,
    diversity: str,
    use_triton: bool,
) -> Tensor:
    if use_triton:
        from ride_fast_kernels.ride_loss import _backward, _prepare

        args = _prepare(expert_logits, target, margins, class_weights, temperature)
        return _backward(grad_output, *args, saved, aux, diversity_factor, temperature_mean, diversity)
    # scale in the saved precision (float32 for float16 logits), then round once
    return (saved * grad_output.to(_compute_dtype(saved.dtype))).to(expert_logits.dtype)


@_ride_loss_backward_op.register_fake
def _(grad_output, expert_logits, target, margins, class_weights, temperature, saved, aux, diversity_factor, temperature_mean, diversity, use_triton):
    return torch.empty(expert_logits.shape, dtype=expert_logits.dtype, device=expert_logits.device)


def _setup_context(ctx, inputs, output):
    z, target, margins, class_weights, temperature, lam, tm, diversity, use_triton, _, _, _, grad_scale = inputs  # aux holds weight_sum
    _, saved, aux, written = output
    ctx.mark_non_differentiable(saved, aux, written)
    ctx.set_materialize_grads(False)  # no [E, B, C] of zeros for the outputs that carry no gradient
    # saved through an alias of its own (same storage, own version counter), not as the output
    # itself: autograd then treats it like any tensor saved for backward, so the analytic
    # gradient handed over below is stolen (no copy) when the graph is freed and copied into a
    # leaf's .grad when the graph is retained
    ctx.save_for_backward(z, target, margins, class_weights, temperature, aux, saved.new_empty(0).set_(saved))
    ctx.args = (lam, tm, diversity, use_triton)
    ctx.z_dtype = z.dtype
    # the gradient the forward wrote (grad_in_forward): held here, not saved for backward, so that
    # the first backward can hand it over as the only reference (autograd then keeps it as a
    # leaf's .grad without a copy) and no later one finds it changed
    ctx.written = written if written.numel() else None
    ctx.grad_scale = grad_scale  # the grad_output it was written for


def _backward(ctx, grad_loss, _grad_saved, _grad_aux, _grad_written):
    z, target, margins, class_weights, temperature, aux, saved = ctx.saved_tensors
    lam, tm, diversity, use_triton = ctx.args
    written, ctx.written = ctx.written, None  # handed over once: a second backward (retain_graph) computes its own
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        if torch.is_grad_enabled() and _eager(grad_loss):  # backward(create_graph=True)
            raise RuntimeError("the RIDE loss operator has no second derivative: its gradient would enter the "
                               "higher-order graph as a constant; use impl='reference' (loss.impl=reference) for "
                               "higher-order gradients")
        if written is not None and _eager(grad_loss):
            # the forward's gradient for grad_output = grad_scale, kept as it is where grad_output is
            # that number and recomputed in place (scaled, rounded once) otherwise: the kernel reads
            # grad_output, so no host sync, and a captured step replays either case
            from ride_fast_kernels.ride_loss import _backward as launch_backward, _prepare

            args = _prepare(z, target, margins, class_weights, temperature)
            grad = launch_backward(grad_loss, *args, saved, aux, lam, tm, diversity, grad_out=written, grad_written=True,
                                   grad_scale=ctx.grad_scale)
        elif (
            not use_triton
            and _eager(grad_loss)
            and grad_loss.device.type == "cpu"
            and saved.dtype == ctx.z_dtype
            and bool(grad_loss == 1.0)  # a host read, free on the CPU; eager only
        ):
            # the usual loss.backward(): hand over the stored gradient without a copy (autograd
            # only steals it when nothing else holds it, so retain_graph=True stays correct)
            grad = saved
        else:
            grad = _ride_loss_backward_op(grad_loss, z, target, margins, class_weights, temperature, saved, aux, lam, tm, diversity, use_triton)
    return grad, None, None, None, None, None, None, None, None, None, None, None, None


_ride_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_target_range(target: Tensor, n_classes: int) -> None:
    bad = (target < 0) | (target >= n_classes)
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        raise ValueError(f"target holds class index(es) {values} outside [0, C) with C = {n_classes}")


def ran_ride_loss_op(loss: Tensor) -> bool:
    """Whether `loss`'s autograd graph holds the backward of the registered RIDE loss operator
    (`torch.ops.ride_fast.ride_loss`: the Triton or the closed-form path) rather than autograd of
    the reference: what a call actually ran, for tests and diagnostics."""
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return _OP_BACKWARD in names


_OP_BACKWARD = "GeneratedBackwardFor_ride_fast_ride_loss_defaultBackward"


def _constants_only(*vectors: Tensor | None) -> bool:
    """The fused paths treat margins / weights / temperatures as constants (no gradient)."""
    return not any(v is not None and v.requires_grad for v in vectors)


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
    weight_sum: Tensor | None = None,
) -> Tensor:
    """The RIDE loss through the chosen implementation; validates its inputs once.

    impl: "reference" (plain PyTorch autograd, any device), "triton" (the fused kernels; CUDA, or
    CPU tensors under TRITON_INTERPRET=1), "auto" (`ride_loss_path`: Triton on CUDA when the
    kernels support the call, the analytic path elsewhere, the reference for individual=False).
    "triton" and the analytic path run as one registered operator, `torch.ops.ride_fast.ride_loss`,
    so `torch.compile(fullgraph=True)` sees one node. Per-class vectors that need a gradient take
    the reference.
    """
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    check_ride_loss_inputs(expert_logits, target, margins, class_weights, temperature, diversity, weight_sum)
    if impl == "triton" and not individual:
        raise ValueError("the fused Triton RIDE loss covers individual=True; use impl='reference' for the collaborative loss")
    return _ride_loss_checked(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity,
                              individual, impl, weight_sum)


def _ride_loss_checked(
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
    weight_sum: Tensor | None = None,
) -> Tensor:
    """`ride_loss` on inputs already validated (loss modules validate once, then call this)."""
    args = (expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity)
    E, _, C = expert_logits.shape
    path = call_path(impl, expert_logits.device, expert_logits.dtype, E, C, individual,
                     _constants_only(margins, class_weights, temperature))
    if path == "reference":
        return ride_loss_reference(*args, individual, weight_sum)
    if impl == "triton":
        if not _TRITON_INSTALLED:
            raise RuntimeError("impl='triton' needs the triton package and ride_fast_kernels; use impl='auto'")
        check_logits("expert_logits", expert_logits, 3, "[E, B, C]")
        if E > MAX_EXPERTS:
            raise ValueError(f"expert_logits has E = {E} experts; the fused kernel supports at most {MAX_EXPERTS}")
    return _run_op(*args, path == "triton", weight_sum)


def _run_op(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity,
            use_triton: bool, weight_sum: Tensor | None = None) -> Tensor:
    """The registered operator's loss, asking for the gradient only where autograd will want it,
    from the forward where `fused_loss_design` says so (for the factor the caller multiplies the loss
    by before its backward, `declared_grad_scale`)."""
    need_grad = expert_logits.requires_grad and torch.is_grad_enabled()
    grad_in_forward = use_triton and need_grad and fused_loss_design(expert_logits) == "grad_in_forward"
    grad_scale = declared_grad_scale() if grad_in_forward else 1.0
    loss, _, _, _ = _ride_loss_op(expert_logits, target, margins, class_weights, temperature, float(diversity_factor),
                                  float(temperature_mean), diversity, use_triton, need_grad, weight_sum, grad_in_forward,
                                  grad_scale)
    return loss




def ride_loss_analytic(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    weight_sum: Tensor | None = None,
) -> Tensor:
    """`ride_loss_reference(..., individual=True)` with an analytic backward; float32 scalar
    (float64 for float64 logits).

    Differentiable with respect to `expert_logits` only (margins, weights and temperatures are
    constants, as in training). Shapes are validated by the caller (`ride_loss`).
    """
    if diversity not in ("mean", "pairwise"):
        raise ValueError(f"diversity must be 'mean' or 'pairwise', got {diversity!r}")
    return _run_op(expert_logits, target, margins, class_weights, temperature, diversity_factor, temperature_mean,
                   diversity, False, weight_sum)


def ride_loss_fused(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    weight_sum: Tensor | None = None,
) -> Tensor:
    """The RIDE loss through the fused kernels, differentiable with respect to `expert_logits`.

    The registered operator `torch.ops.ride_fast.ride_loss` with the Triton path forced (CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1). Returns a float32 scalar; the gradient
    comes back in the logits' dtype.
    """
    return ride_loss(expert_logits, target, margins, class_weights, temperature, diversity_factor,
                     temperature_mean, diversity, impl="triton", weight_sum=weight_sum)
