"""Quantities derived from the training class counts (docs/method.md §3), computed once on the host.

Shape legend: C classes.

    class_counts  [C]  n_c, training images of class c (integers >= 1)

Every function validates the counts, works in float64 and returns a float64 CPU tensor of shape
[C]; the loss modules cast the result to float32 buffers that follow the module's device.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

ClassCounts = Union[Sequence[int], np.ndarray, Tensor]


def validate_class_counts(class_counts: ClassCounts) -> np.ndarray:
    """Return the counts as a 1-D int64 numpy array, or raise a ValueError that names the bad classes.

    The counts must be 1-D, hold at least two classes, be whole numbers and be >= 1: a class with
    no training image has no LDAM margin (n^-1/4) and no class-balanced weight (1/(1 - beta^n)).
    """
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    try:
        arr = np.asarray(class_counts)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"class_counts must be a 1-D sequence of integers, got {class_counts!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"class_counts must be 1-D (one count per class), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"class_counts needs at least 2 classes, got {arr.shape[0]}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"class_counts must hold integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            raise ValueError(
                f"class_counts must be whole numbers; class index(es) {bad[:10].tolist()} have "
                f"{arr[bad[:10]].tolist()}"
            )
    arr = arr.astype(np.int64)
    negative = np.flatnonzero(arr < 0)
    if negative.size:
        raise ValueError(
            f"class_counts must be >= 1; class index(es) {negative[:10].tolist()} have negative counts "
            f"{arr[negative[:10]].tolist()}"
        )
    empty = np.flatnonzero(arr == 0)
    if empty.size:
        more = f" (and {empty.size - 10} more)" if empty.size > 10 else ""
        raise ValueError(
            f"class_counts: class index(es) {empty[:10].tolist()}{more} have zero training images; "
            "every class needs at least one (LDAM margins and class-balanced weights are undefined "
            "at n = 0). Fix the training list or drop those classes."
        )
    return arr


def ldam_margins(class_counts: ClassCounts, max_m: float = 0.5) -> Tensor:
    """LDAM margins m_c = max_m * n_c^(-1/4) / max_c' n_c'^(-1/4): the rarest class gets max_m.

    Returned in units of the cosine (before the scale s); the losses pass s * m_c to the op.
    """
    n = validate_class_counts(class_counts).astype(np.float64)
    if not max_m > 0:
        raise ValueError(f"max_m must be > 0, got {max_m}")
    m = 1.0 / np.sqrt(np.sqrt(n))
    return torch.from_numpy(m * (max_m / m.max()))


def class_balanced_weights(class_counts: ClassCounts, beta: float = 0.9999) -> Tensor:
    """Class-balanced ("effective number") weights w_c = (1 - beta) / (1 - beta^n_c), scaled so sum_c w_c = C.

    beta = 0 gives all ones; beta -> 1 approaches inverse class frequency.
    """
    n = validate_class_counts(class_counts).astype(np.float64)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return torch.from_numpy(w / w.sum() * n.shape[0])


def diversity_temperatures(class_counts: ClassCounts, reweight_factor: float = 0.05) -> Tensor:
    """Distribution-aware diversity temperatures t_c (before multiplying by T_base).

        p_c = n_c / sum n,   t_c = C * p_c * gamma + 1 - gamma,   t_c <- t_c / max_c t_c

    gamma = reweight_factor. Head classes get 1, tail classes less. All t_c must be > 0, which holds
    for 0 <= gamma <= 1; a larger gamma that makes some t_c <= 0 raises ValueError.
    """
    n = validate_class_counts(class_counts).astype(np.float64)
    p = n / n.sum()
    t = n.shape[0] * p * reweight_factor + 1.0 - reweight_factor
    if not np.all(t > 0):
        raise ValueError(
            f"reweight_factor {reweight_factor} is too large: it makes the diversity temperatures of "
            f"class index(es) {np.flatnonzero(t <= 0)[:10].tolist()} non-positive (use 0 <= gamma <= 1)"
        )
    return torch.from_numpy(t / t.max())


__all__ = [
    "ClassCounts",
    "class_balanced_weights",
    "diversity_temperatures",
    "ldam_margins",
    "validate_class_counts",
]
