"""A batch's RIDE loss computed in parts, as a training step split over ranks or micro-batches
computes it: each part divides its classification term by its share of the whole batch's weight
sum (`weight_sum`) and is scaled by its share of the images."""
from __future__ import annotations

from itertools import pairwise

import torch


def loss_and_grad_in_parts(call, z, y, margins, weights, temperature, cuts):
    """(loss, grad [E, B, C]) of the batch from `call(z_part, y_part, margins, weights, temperature,
    weight_sum=...)` on the parts [cuts[i], cuts[i + 1]) of the batch axis."""
    B = y.shape[0]
    total = weights.double()[y].sum() if weights is not None else torch.tensor(float(B), dtype=torch.float64)
    loss, grads = 0.0, []
    for lo, hi in pairwise(cuts):
        share = (hi - lo) / B
        x = z[:, lo:hi].detach().clone().requires_grad_()
        part = call(x, y[lo:hi], margins, weights, temperature, weight_sum=(total * share).to(z.device)) * share
        part.backward()
        loss = loss + part.detach()
        grads.append(x.grad)
    return loss, torch.cat(grads, dim=1)
