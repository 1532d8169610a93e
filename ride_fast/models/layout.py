"""The two state-dict layouts of a RIDE network, and the conversion between them.

Shape legend: E experts, C classes, D feature width of one expert, n dim 0 of one expert's tensor.

    per-expert (RIDENet)          experts.{i}.<rest> [n, ...]     heads.{i}.<rest> [...]
    batched (BatchedRIDENet)      experts.<rest>     [E*n, ...]   heads.<rest>     [E, ...]

Expert e owns the rows [e*n, (e+1)*n) of every batched expert tensor and index e of every batched
head tensor (docs/method.md §2), so converting is a concatenation / stack one way and a chunk /
unbind the other. Keys outside `experts.` and `heads.` (trunk.*) are the same in both layouts.

This module is a leaf: it imports nothing of ride_fast.models, so both network classes can read
either layout.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_PER_EXPERT_KEY = re.compile(r"^(?P<part>experts|heads)\.(?P<i>\d+)\.(?P<rest>.+)$")


def is_per_expert_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a RIDENet state dict holds per-expert keys (experts.{i}.*, heads.{i}.*)."""
    return any(_PER_EXPERT_KEY.match(k) for k in state_dict)


def is_batched_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a RIDENet state dict holds batched keys (experts.<stage>.*, heads.weight)."""
    return any(k.startswith(("experts.", "heads.")) for k in state_dict) and not is_per_expert_layout(state_dict)


def batched_state_dict(state_dict: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """Per-expert RIDENet state dict -> BatchedRIDENet state dict.

    experts.{i}.<rest> [n, ...] -> experts.<rest> [E*n, ...] (concatenated in expert order);
    heads.{i}.<rest> [...] -> heads.<rest> [E, ...] (stacked); 0-d tensors (BN num_batches_tracked)
    take expert 0's value; other keys (trunk.*) are kept.
    """
    groups: dict[str, dict[int, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _PER_EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
        else:
            groups.setdefault(f"{m['part']}.{m['rest']}", {})[int(m["i"])] = value
    for key, per in groups.items():
        if sorted(per) != list(range(num_experts)):
            raise ValueError(f"{key}: expected experts 0..{num_experts - 1} in the state dict, found {sorted(per)}")
        tensors = [per[i] for i in range(num_experts)]
        if key.startswith("heads."):
            out[key] = torch.stack(tensors)
        elif tensors[0].dim() == 0:
            out[key] = tensors[0]
        else:
            out[key] = torch.cat(tensors)
    return out


def per_expert_state_dict(state_dict: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """BatchedRIDENet state dict -> per-expert RIDENet state dict (the inverse of batched_state_dict)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part == "heads":
            parts = value.unbind(0)
        elif part == "experts":
            if value.dim() == 0:
                parts = (value,) * num_experts
            else:
                if value.shape[0] % num_experts:
                    raise ValueError(f"{key}: dim 0 of size {value.shape[0]} does not split into {num_experts} experts")
                parts = value.chunk(num_experts)
        else:
            out[key] = value
            continue
        if len(parts) != num_experts:
            raise ValueError(f"{key}: holds {len(parts)} experts, expected {num_experts}")
        for i, t in enumerate(parts):
            out[f"{part}.{i}.{rest}"] = t.clone()
    return out


__all__ = ["batched_state_dict", "is_batched_layout", "is_per_expert_layout", "per_expert_state_dict"]
