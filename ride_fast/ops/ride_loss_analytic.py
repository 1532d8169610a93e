"""The RIDE loss with its gradient computed analytically in the forward pass (plain PyTorch).

The default path of `ride_loss(impl="auto")` where the fused Triton kernel does not run (CPU).
Same value as `ride_loss_reference(..., individual=True)`; instead of recording ~20 autograd
nodes over [E, B, C] tensors it evaluates the closed-form gradient of docs/method.md §3 with a
few in-place passes, and the backward only scales it by grad_output. It runs as the CPU branch
of the registered operator `torch.ops.ride_fast.ride_loss` (see `ride_fast.ops.ride_loss`, which
also holds `ride_loss_analytic`, the operator with this branch forced). A leaf: it imports torch only.

Shape legend: E experts, B images, C classes (see `ride_fast.ops.ride_loss` for the inputs).
With a_k = z_k - margins[y] onehot(y), c_i = w_{y_i} / sum_j w_{y_j} (1/B unweighted),
u_k = z_k / T, q_k = softmax(u_k), pbar = softmax(mean_k z_k / T) (detached), S = sum_j log q_j,
Q = sum_j q_j, K_k = sum_c q_k (E log q_k - S), d = lambda Tm^2 / B (/(E-1) for "pairwise"):

    d loss / d z_k = c (softmax(a_k) - onehot(y)) + d (q_k - pbar) / T                     "mean"
                   = c (softmax(a_k) - onehot(y)) + d [q_k (E log q_k - S - K_k) + E q_k - Q] / T
                                                                                       "pairwise"
and, since sum_k z_k / T = E zbar / T, the "mean" KL needs no pass of its own:

    sum_k KL(pbar || q_k) = sum_k lse(u_k) - E lse(zbar / T)       (per image)

Every log-sum-exp comes with a softmax: lse(x) = x_y - log softmax(x)_y, read at the target
column (see `_softmax_lse`). So the "mean" mode runs seven ops over [E, B, C], forward and backward
together: a copy (the LDAM logits), two softmaxes (one exponential per logit each), z / T, a sum
over experts and two multiply-adds; 14 reads and writes of [E, B, C], two buffers of its size. Why
it is built so, and what it measured: docs/performance-notes.md.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _host_reads_are_free(x: Tensor) -> bool:
    """Whether reading a value of x on the host costs nothing (the CPU) or waits for a device."""
    return x.device.type == "cpu"


def _softmax_lse(x: Tensor, out: Tensor, index: Tensor, rebuild: Callable[[], Tensor]) -> Tensor:
    """Write softmax(x) over the last dim into `out` (x itself or a buffer of its shape: ATen's row
    kernel reads a row before writing it); return x's log-sum-exp [..., B] for x [..., B, C].

    On the CPU, lse = x_i - log softmax(x)_i at column i = index[b] of each row: the softmax's own
    normaliser, at no extra pass. Where softmax(x)_i is too small for its log to be exact (under
    2^24 times the dtype's smallest normal number: column i some 80 below the row's maximum in
    float32), those rows' lse is recomputed from `rebuild()`, which returns x anew. Elsewhere that
    check would wait for the device, so the lse comes from two reductions instead:
    lse = max x - log max softmax(x) (the largest entry of a softmax is 1 / sum exp(x - max x)).
    """
    if not _host_reads_are_free(x):
        x_max = x.amax(-1)
        torch.ops.aten._softmax.out(x, -1, False, out=out)
        return x_max - out.amax(-1).log()
    rows = torch.arange(x.shape[-2], device=x.device)
    x_i = x[..., rows, index]
    p_i = torch.ops.aten._softmax.out(x, -1, False, out=out)[..., rows, index]
    lse = x_i - p_i.log()
    small = p_i < torch.finfo(x.dtype).tiny * 2**24
    if bool(small.any()):  # a host read, free on the CPU
        lse[small] = torch.logsumexp(rebuild()[small], dim=-1)
    return lse


def _ride_loss_and_grad(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None,
    class_weights: Tensor | None,
    temperature: Tensor | None,
    diversity_factor: float,
    temperature_mean: float,
    diversity: str,
    weight_sum: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss scalar, grad [E, B, C]) of the individual RIDE loss, in the compute dtype
    (float32; float64 for float64 logits, like the reference).

    Two [E, B, C] buffers: `grad` (the LDAM logits, then their softmax, then the gradient) and
    `work` (z / T, then q, then the diversity term of the gradient).
    """
    z = expert_logits.detach()
    E, B, _ = z.shape
    dtype = torch.promote_types(z.dtype, torch.float32)
    # contiguous: the buffers below take z's layout, and ATen's softmax writes an out= buffer in
    # contiguous order whatever its strides. No copy for contiguous float32 / float64.
    z = z.to(dtype).contiguous()
    y = target.long()
    rows = torch.arange(B, device=z.device)
    divisor = None if weight_sum is None else weight_sum.detach().to(dtype).reshape(())  # the whole batch's sum w
    if class_weights is not None:
        w = class_weights.detach().to(dtype)[y]  # [B]
        coef = w / (w.sum() if divisor is None else divisor)
    elif divisor is None:
        coef = torch.full((B,), 1.0 / B, dtype=dtype, device=z.device)
    else:
        coef = torch.ones(B, dtype=dtype, device=z.device) / divisor
    mode = "none" if diversity_factor == 0.0 or (diversity == "pairwise" and E == 1) else diversity

    # ---- LDAM / CE: loss = sum_i c_i (lse(a) - a_y), grad = c (softmax(a) - onehot)
    m_y = margins.detach().to(dtype)[y] if margins is not None else None

    def ldam_logits() -> Tensor:
        a = z.clone()
        if m_y is not None:
            a[:, rows, y] -= m_y
        return a

    grad = ldam_logits()
    a_y = grad[:, rows, y]  # [E, B]
    loss = ((_softmax_lse(grad, grad, y, ldam_logits) - a_y) * coef).sum()  # grad = softmax(a)

    if mode == "none":
        grad.mul_(coef.view(1, B, 1))
        grad[:, rows, y] -= coef
        return loss, grad

    inv_t = 1.0 / temperature.detach().to(dtype) if temperature is not None else None
    scale = diversity_factor * temperature_mean**2 / B  # d

    def tempered() -> Tensor:  # u = z / T (z itself when T = 1)
        return z * inv_t if inv_t is not None else z

    u = tempered()
    work = u if inv_t is not None else torch.empty_like(z)  # u, then q
    if mode == "mean":
        vbar = u.sum(0).div_(E)  # zbar / T  [B, C]
        lse_u = _softmax_lse(u, work, y, tempered)  # work = q
        lse_v = _softmax_lse(vbar, vbar, y, lambda: tempered().mean(0))  # vbar = pbar
        # sum_k KL(pbar || q_k) = sum_k lse(u_k) - E lse(vbar), because sum_k u_k = E vbar
        loss = loss + scale * (lse_u.sum() - E * lse_v.sum())
        # grad = c softmax(a) + d (q - pbar) / T, then - c at the target
        if inv_t is not None:
            s_c = scale * inv_t  # d / T  [C]
            torch.addcmul(vbar.mul_(s_c).neg_(), work, s_c, out=work)
        else:
            torch.add(vbar.mul_(-scale), work, alpha=scale, out=work)
        torch.addcmul(work, grad, coef.view(1, B, 1), out=grad)
        grad[:, rows, y] -= coef
        return loss, grad

    # "pairwise": K_k = <q_k, E log q_k - S>, grad += d' [q_k (E log q_k - S - K_k) + E q_k - Q] / T
    scale = scale / (E - 1)  # d'
    grad.mul_(coef.view(1, B, 1))
    grad[:, rows, y] -= coef
    log_q = torch.log_softmax(u, dim=-1, out=work)
    q = log_q.exp()
    h = torch.add(log_q.sum(0).neg_(), log_q, alpha=E, out=log_q)  # E log q_k - S, in place
    k_pair = torch.einsum("ebc,ebc->eb", q, h)  # K [E, B]
    loss = loss + scale * k_pair.sum()
    h.sub_(k_pair.sub_(E)[..., None])  # E log q_k - S - K_k + E
    g_div = torch.addcmul(q.sum(0).neg_(), h, q, out=h)  # q (E log q - S - K + E) - Q
    if inv_t is not None:
        grad.addcmul_(g_div, scale * inv_t)
    else:
        grad.add_(g_div, alpha=scale)
    return loss, grad
