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

    sum_k KL(pbar || q_k) = sum_k lse(z_k / T) - E lse(zbar / T)       (per image)

Memory: about 15 passes over [E, B, C] in all (forward and backward; a log-softmax counts 3),
against about 30 for autograd of the reference; two [E, B, C] buffers besides the input.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _ride_loss_and_grad(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None,
    class_weights: Tensor | None,
    temperature: Tensor | None,
    diversity_factor: float,
    temperature_mean: float,
    diversity: str,
) -> tuple[Tensor, Tensor]:
    """(loss scalar, grad [E, B, C]) of the individual RIDE loss, in the compute dtype
    (float32; float64 for float64 logits, like the reference).

    Two [E, B, C] buffers: `grad` (log-softmax of the LDAM logits, then the gradient) and `work`
    (the LDAM logits, then z / T and its log-softmax). Few, large, mostly in-place ops: on a
    small shared CPU every op also pays a thread hand-off, so fewer ops beat cache blocking.
    """
    z = expert_logits.detach()
    E, B, C = z.shape
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)  # no copy for float32 / float64
    y = target.long()
    rows = torch.arange(B, device=z.device)
    if class_weights is not None:
        w = class_weights.detach().to(dtype)[y]  # [B]
        coef = w / w.sum()
    else:
        coef = torch.full((B,), 1.0 / B, dtype=dtype, device=z.device)
    mode = "none" if diversity_factor == 0.0 or (diversity == "pairwise" and E == 1) else diversity

    # ---- LDAM / CE: loss = sum_i c_i (lse(a) - a_y), grad = c (softmax(a) - onehot)
    work = None
    if margins is not None:
        work = z.clone()
        work[:, rows, y] -= margins.detach().to(dtype)[y]
    grad = torch.log_softmax(work if work is not None else z, dim=-1)
    loss = -(grad[:, rows, y] * coef).sum()
    grad.exp_()  # softmax(a)

    if mode == "none":
        grad.mul_(coef.view(1, B, 1))
        grad[:, rows, y] -= coef
        return loss, grad

    inv_t = 1.0 / temperature.detach().to(dtype) if temperature is not None else None
    scale = diversity_factor * temperature_mean**2 / B  # d
    if work is None:
        work = torch.empty_like(z)
    log_q = torch.mul(z, inv_t, out=work) if inv_t is not None else work.copy_(z)  # u = z / T
    u0 = log_q[..., 0].clone()  # [E, B]
    torch.log_softmax(log_q, dim=-1, out=log_q)  # in place
    if mode == "mean":
        zbar = z.mean(0)  # [B, C]
        vbar = zbar * inv_t if inv_t is not None else zbar
        log_p = torch.log_softmax(vbar, dim=-1)  # [B, C]
        lse_v = vbar[:, 0] - log_p[:, 0]  # [B]
        p = log_p.exp_()  # pbar
        # sum_k KL(p || q_k) = sum_k lse(u_k) - E lse(vbar), because sum_k u_k = E vbar
        lse_u = u0 - log_q[..., 0]  # [E, B]
        loss = loss + scale * (lse_u.sum() - E * lse_v.sum())
        # grad = c softmax(a) - d p / T + d q / T, then - c at the target
        s_c = scale * inv_t if inv_t is not None else torch.full((C,), scale, dtype=dtype, device=z.device)
        torch.addcmul(-(p * s_c), grad, coef.view(1, B, 1), out=grad)
        grad.addcmul_(log_q.exp_(), s_c)
        grad[:, rows, y] -= coef
        return loss, grad

    # "pairwise": K_k = <q_k, E log q_k - S>, grad += d' [q_k (E log q_k - S - K_k) + E q_k - Q] / T
    scale = scale / (E - 1)  # d'
    grad.mul_(coef.view(1, B, 1))
    grad[:, rows, y] -= coef
    q = log_q.exp()
    s_sum = log_q.sum(0)  # S [B, C]
    h = log_q.mul_(E).sub_(s_sum)  # E log q_k - S, in place
    k_pair = torch.einsum("ebc,ebc->eb", q, h)  # K [E, B]
    loss = loss + scale * k_pair.sum()
    g_div = h.sub_(k_pair[..., None]).add_(E).mul_(q).sub_(q.sum(0))  # q (E log q - S - K) + E q - Q
    if inv_t is not None:
        g_div.mul_(inv_t)
    grad.add_(g_div, alpha=scale)
    return loss, grad
