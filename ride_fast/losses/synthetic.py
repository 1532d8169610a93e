"""Synthetic inputs of the RIDE loss: logits, targets and the per-class vectors a real run derives
from its class counts. One builder for the tests and the benchmarks of every loss path.

Shape legend: E experts, B images, C classes.

    logits       [E, B, C]  s-scaled expert logits ("gaussian": scale * N(0, 1) with every other
                            row confident in its target; "cosine": s * tanh(0.3 N(0, 1)), inside
                            [-s, s] like a cosine head's)
    target       [B]        int64 class indices
    counts       [C]        long-tailed training counts (int64), drawn with the seed
    margins      [C]        s * m_c (`ldam_margins`)
    class_weights[C]        DRW weights (`class_balanced_weights`), None in the first phase
    temperature  [C]        T_base * t_c (`diversity_temperatures`), None in the first phase
                            (all ones: the op's default) unless T_base != 1
    temperature_mean        mean_c T_c of the phase (a host float)

Everything derived from the counts goes through `ride_fast.losses.weights`, so the inputs of a
test are the inputs training builds.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ride_fast.losses.weights import class_balanced_weights, diversity_temperatures, ldam_margins


class RideLossInputs(NamedTuple):
    logits: Tensor
    target: Tensor
    margins: Tensor | None
    class_weights: Tensor | None
    temperature: Tensor | None
    temperature_mean: float
    counts: Tensor

    @property
    def vectors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(margins, class_weights, temperature), in the order the ops take them."""
        return self.margins, self.class_weights, self.temperature


def long_tailed_counts(num_classes: int, generator: torch.Generator, max_count: int = 500) -> Tensor:
    """[C] int64 counts >= 1 in random class order, from max_count down to about max_count / 100."""
    ranks = torch.randperm(num_classes, generator=generator).double()
    counts = max_count * torch.pow(100.0, -ranks / max(num_classes - 1, 1))
    return counts.round().clamp_min(1).long()


def ride_loss_inputs(
    E: int,
    B: int,
    C: int,
    *,
    phase: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    logits: str = "gaussian",
    scale: float = 6.0,
    s: float = 30.0,
    max_m: float = 0.5,
    beta: float = 0.9999,
    reweight_factor: float = 0.05,
    base_temperature: float = 1.0,
    margins: bool = True,
    vector_dtype: torch.dtype = torch.float32,
    confident: bool = True,
) -> RideLossInputs:
    """Inputs of `ride_fast.ops.ride_loss` as training builds them (see the module docstring).

    phase 0: margins only (before the DRW switch, T = 1); phase 1: margins, DRW weights and the
    distribution-aware temperatures. `margins=False` drops the margins (plain CE);
    `confident=False` leaves the "gaussian" logits without the confident rows. The logits are
    drawn in float64 and cast to `dtype`; the vectors come in `vector_dtype`.
    """
    if phase not in (0, 1):
        raise ValueError(f"phase must be 0 (before the DRW switch) or 1 (after), got {phase!r}")
    if logits not in ("gaussian", "cosine"):
        raise ValueError(f"logits must be 'gaussian' or 'cosine', got {logits!r}")
    g = torch.Generator().manual_seed(seed)
    if logits == "gaussian":
        z = scale * torch.randn(E, B, C, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (B,), generator=g)
        if confident:
            rows = torch.arange(0, B, 2)
            z[:, rows, y[rows]] += 2.0 * scale  # every other row confident in its target
    else:
        z = s * torch.tanh(0.3 * torch.randn(E, B, C, generator=g, dtype=torch.float64))
        y = torch.randint(0, C, (B,), generator=g)
    counts = long_tailed_counts(C, g)
    to = lambda v: v.to(device=device, dtype=vector_dtype)  # noqa: E731
    m = to(s * ldam_margins(counts, max_m)) if margins else None
    if phase == 1:
        t = base_temperature * diversity_temperatures(counts, reweight_factor)
        w, tm, t = to(class_balanced_weights(counts, beta)), float(t.mean()), to(t)
    else:
        w, t, tm = None, None, float(base_temperature)
        if base_temperature != 1.0:
            t = to(torch.full((C,), base_temperature, dtype=torch.float64))
    return RideLossInputs(z.to(device=device, dtype=dtype), y.to(device), m, w, t, tm, counts)


__all__ = ["RideLossInputs", "long_tailed_counts", "ride_loss_inputs"]
