"""The router of RIDE (expert assignment, stage 2): E - 1 small decision heads (docs/method.md §5).

Shape legend: B images, E experts, R = E - 1 routers, C classes, D pooled feature width of one
expert, H hidden width (16), k top-k logits (30 or 50).

    feature_i      [B, D]     pooled feature of expert i (the last one run)
    mean_logits_i  [B, C]     running mean of the s-scaled logits of experts 1..i
    router logit   [B]        r_i; the image calls expert i+1 when sigmoid(r_i) > threshold

Router i (0-based `step`, deciding on expert step + 2):
    h = ReLU(Linear_i(feature / ||feature||))          Linear_i: D -> H, one per router
    v = top-k of mean_logits / logit_scale, descending  [B, k]
    r = Linear([v, h])                                  k + H -> 1, shared by all routers

The routers compute in their own dtype (float32) with autocast off, whatever precision the
network runs in: calibration places a threshold between two images' probabilities from a float32
replay (`ride_fast.engine.threshold_curve`), and routed inference must take the same decisions,
which bf16's 8 significant bits would not.

`logit_scale` is the classifier scale s of the network (30 for cosine classifiers; stage 2 builds
the router with it). The original feeds the s-scaled logits themselves: the same functions (the
top-k weights times s), but the top-k inputs are then about s times larger than the unit-norm
hidden path, and with the positive weight w_on = 100 one SGD step at the published lr moves the
router logit by tens: training overshoots between "call every image" and "call none" (see
docs/method.md §5). Dividing by s makes every input O(1). Original weights load into a router of
any logit_scale as the same function (`load_original_state_dict` multiplies the top-k weights by s).

Parameter names and their originals (frank-xwang/RIDE-LongTailRecognition):
    hidden.{i}.weight [H, D], hidden.{i}.bias [H]   <- expert_help_pred_hidden_fcs.{i}.*
    fc.weight [1, k + H], fc.bias [1]                <- expert_help_pred_fc.*  (shared, the default)
    fcs.{i}.weight, fcs.{i}.bias                     <- expert_help_pred_fcs.{i}.*  (share_fc=False)
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.models.heads import full_precision

ORIGINAL_PREFIX = "expert_help_pred"
_ORIGINAL_NAMES = (
    (re.compile(r"^expert_help_pred_hidden_fcs\.(\d+)\.(weight|bias)$"), r"hidden.\1.\2"),
    (re.compile(r"^expert_help_pred_fc\.(weight|bias)$"), r"fc.\1"),
    (re.compile(r"^expert_help_pred_fcs\.(\d+)\.(weight|bias)$"), r"fcs.\1.\2"),
)


def _ride_fast_name(key: str) -> str:
    """A Router parameter's name for an original router key; KeyError for any other key."""
    short = key[key.index(ORIGINAL_PREFIX):] if ORIGINAL_PREFIX in key else key
    for pattern, repl in _ORIGINAL_NAMES:
        if pattern.match(short):
            return pattern.sub(repl, short)
    raise KeyError(f"{key!r} is not a router weight of the original RIDE code (expected {ORIGINAL_PREFIX}_hidden_fcs.i.*, _fc.* or _fcs.i.*)")


def _original_name(key: str) -> str:
    """The original code's name of a Router parameter (hidden.i.*, fc.*, fcs.i.*): the inverse of
    `_ride_fast_name`, by the table in the module docstring."""
    head, _, rest = key.partition(".")
    return f"{ORIGINAL_PREFIX}_{'hidden_fcs' if head == 'hidden' else head}.{rest}"


def _renamed(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(original router weights under this module's names, this module's name -> the key as given)."""
    given = {_ride_fast_name(key): key for key in state}
    return {name: state[key] for name, key in given.items()}, given


class Router(nn.Module):
    """E - 1 routers after experts 1..E-1; see the module docstring for the computation.

    `router_args` rebuilds the same architecture: `Router(**router.router_args)`.
    """

    def __init__(
        self,
        num_experts: int,
        feature_dim: int,
        num_classes: int,
        top_k: int = 30,
        hidden: int = 16,
        share_fc: bool = True,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"a router needs at least 2 experts to choose between, got num_experts={num_experts}")
        if not 1 <= top_k <= num_classes:
            raise ValueError(
                f"router.top_k={top_k} must lie in 1..{num_classes} (the number of classes); "
                f"set router.top_k={min(num_classes, 30)} for this data set"
            )
        if not logit_scale > 0:
            raise ValueError(f"router logit_scale must be > 0 (the classifier scale s of the network), got {logit_scale}")
        if hidden < 1 or feature_dim < 1:
            raise ValueError(f"router hidden width and feature width must be >= 1, got hidden={hidden}, feature_dim={feature_dim}")
        self.num_experts = int(num_experts)
        self.num_routers = self.num_experts - 1
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.top_k = int(top_k)
        self.hidden_dim = int(hidden)
        self.share_fc = bool(share_fc)
        self.logit_scale = float(logit_scale)
        self.hidden = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(self.num_routers))
        if self.share_fc:
            self.fc = nn.Linear(top_k + hidden, 1)
        else:
            self.fcs = nn.ModuleList(nn.Linear(top_k + hidden, 1) for _ in range(self.num_routers))

    @property
    def router_args(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "feature_dim": self.feature_dim, "num_classes": self.num_classes,
                "top_k": self.top_k, "hidden": self.hidden_dim, "share_fc": self.share_fc, "logit_scale": self.logit_scale}

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_routers:
            raise IndexError(f"router step {step} out of range: {self.num_routers} routers (steps 0..{self.num_routers - 1})")

    def forward(self, step: int, feature: Tensor, mean_logits: Tensor) -> Tensor:
        """Router `step` (0-based: after expert step + 1) on [B, D] features and [B, C] running
        mean logits -> router logits [B]."""
        self._check_step(step)
        if feature.dim() != 2 or mean_logits.dim() != 2 or feature.shape[0] != mean_logits.shape[0]:
            raise ValueError(f"router expects feature [B, D] and mean_logits [B, C]; got {tuple(feature.shape)} and {tuple(mean_logits.shape)}")
        ctx, dtype = full_precision(self.hidden[0].weight)  # float32 with autocast off: see the module docstring
        with ctx:
            feature, mean_logits = feature.to(dtype), mean_logits.to(dtype)
            # plain division by the norm, as the original (a zero feature gives NaN -> stop)
            h = F.relu(self.hidden[step](feature / feature.norm(dim=1, keepdim=True)))
            v = mean_logits.topk(self.top_k, dim=1).values / self.logit_scale  # sorted, descending; cosines when s-scaled
            x = torch.cat((v, h), dim=1)
            fc = self.fc if self.share_fc else self.fcs[step]
            return fc(x).squeeze(1)

    def forward_all(self, features: Tensor, mean_logits: Tensor) -> Tensor:
        """Every router on every image at once (training): features [R, B, D] of experts 1..E-1
        and their running means [R, B, C] -> router logits [R, B]."""
        R = self.num_routers
        if features.dim() != 3 or features.shape[0] != R or mean_logits.shape[:2] != features.shape[:2]:
            raise ValueError(
                f"forward_all expects features [R={R}, B, D] and mean_logits [R, B, C]; "
                f"got {tuple(features.shape)} and {tuple(mean_logits.shape)}"
            )
        ctx, dtype = full_precision(self.hidden[0].weight)  # float32 with autocast off: see the module docstring
        with ctx:
            features, mean_logits = features.to(dtype), mean_logits.to(dtype)
            w = torch.stack([lin.weight for lin in self.hidden])  # [R, H, D]
            b = torch.stack([lin.bias for lin in self.hidden])  # [R, H]
            f = features / features.norm(dim=2, keepdim=True)
            h = F.relu(torch.baddbmm(b.unsqueeze(1), f, w.transpose(1, 2)))  # [R, B, H]
            v = mean_logits.topk(self.top_k, dim=2).values / self.logit_scale  # [R, B, k]
            x = torch.cat((v, h), dim=2)  # [R, B, k + H]
            if self.share_fc:
                return self.fc(x).squeeze(2)
            fw = torch.stack([lin.weight for lin in self.fcs])  # [R, 1, k + H]
            fb = torch.stack([lin.bias for lin in self.fcs])  # [R, 1]
            return torch.baddbmm(fb.unsqueeze(1), x, fw.transpose(1, 2)).squeeze(2)

    def extra_repr(self) -> str:
        return f"num_routers={self.num_routers}, top_k={self.top_k}, hidden={self.hidden_dim}, share_fc={self.share_fc}"

    # ------------------------------------------------------------------ original weights
    @staticmethod
    def original_to_ride_fast(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rename original router keys (`expert_help_pred_*`, with or without `module.` /
        `backbone.` prefixes) to this module's names; other keys are an error."""
        return _renamed(state)[0]

    @classmethod
    def from_original(cls, state: Mapping[str, Tensor], num_classes: int, num_experts: int | None = None,
                      feature_dim: int | None = None) -> "Router":
        """A Router holding original router weights (e.g. the "router" entry that `ride-fast
        convert` writes); its sizes (E, D, H, k, shared or not) are read from the tensors.
        num_experts, feature_dim: the network's E and D, where known (`ride-fast convert` passes
        them): weights for another number of experts or another feature width are refused then.
        A ValueError names every original key that is missing, unexpected or of the wrong shape."""
        renamed, given = _renamed(state)
        hidden_ix = sorted({int(k.split(".")[1]) for k in renamed if k.startswith("hidden.")})
        if num_experts is None and (not hidden_ix or hidden_ix != list(range(len(hidden_ix)))):
            raise ValueError(f"original router weights need expert_help_pred_hidden_fcs.0..R-1; found indices {hidden_ix}")
        hidden_key = next((f"hidden.{i}.weight" for i in hidden_ix if f"hidden.{i}.weight" in renamed), None)
        if hidden_key is None:
            raise ValueError("original router weights hold no expert_help_pred_hidden_fcs.i.weight (the hidden layer [H, D])")
        share_fc = any(k.startswith("fc.") for k in renamed)
        fc_key = "fc.weight" if share_fc else next((k for k in sorted(renamed) if k.startswith("fcs.") and k.endswith(".weight")), None)
        if fc_key is None or fc_key not in renamed:
            raise ValueError("original router weights hold no expert_help_pred_fc(s) weight")
        hidden_w, fc_weight = renamed[hidden_key], renamed[fc_key]
        if hidden_w.dim() != 2:
            raise ValueError(f"{given[hidden_key]} has shape {list(hidden_w.shape)}; a router's hidden layer is [H, D]")
        hidden = int(hidden_w.shape[0])
        top_k = int(fc_weight.shape[-1]) - hidden if fc_weight.dim() == 2 else 0
        if fc_weight.dim() != 2 or not 1 <= top_k <= num_classes:
            raise ValueError(f"{given[fc_key]} has shape {list(fc_weight.shape)}; expected [1, k + H] with H = {hidden} (from "
                             f"{given[hidden_key]} {list(hidden_w.shape)}) and k, the top-k logits it reads, in 1..{num_classes}")
        router = cls(num_experts if num_experts is not None else len(hidden_ix) + 1,
                     feature_dim if feature_dim is not None else int(hidden_w.shape[1]),
                     num_classes, top_k=top_k, hidden=hidden, share_fc=share_fc)
        router.load_original_state_dict(state)
        return router

    def load_original_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load original router weights; names, counts and shapes must all fit (strict), else a
        ValueError names each original key at fault with its shapes. The top-k weights are
        multiplied by `logit_scale`, so the router computes the original's function."""
        renamed, given = _renamed(state)
        own = self.state_dict()
        missing = [f"{_original_name(k)} {list(own[k].shape)}" for k in sorted(set(own) - set(renamed))]
        unexpected = [f"{given[k]} {list(renamed[k].shape)}" for k in sorted(set(renamed) - set(own))]
        shapes = [f"{given[k]}: checkpoint {list(renamed[k].shape)} vs router {list(own[k].shape)}"
                  for k in sorted(set(own) & set(renamed)) if renamed[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            found = [f"{title} {', '.join(items)}" for title, items in
                     (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if items]
            raise ValueError(f"original router weights do not fit Router({self.router_args}): {'; '.join(found)}")
        if self.logit_scale != 1.0:
            for key in [k for k in renamed if k.endswith("weight") and (k == "fc.weight" or k.startswith("fcs."))]:
                w = renamed[key].clone()
                w[:, : self.top_k] *= self.logit_scale
                renamed[key] = w
        self.load_state_dict(renamed)
