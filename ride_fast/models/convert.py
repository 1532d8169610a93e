"""Load checkpoints of the original RIDE code (frank-xwang/RIDE-LongTailRecognition).

Shape legend: E experts, C classes, D expert feature width.

Original names (after the `module.` prefix of DataParallel and the `backbone.` prefix of its
Model wrapper are stripped) and where they go in a RIDENet:

    conv1.* bn1.* layer1.* [layer2.*]   shared stem and stages       -> trunk.<same>
    <stage>s.{i}.*                      expert i's stages            -> experts.{i}.<stage>.*
        CIFAR ResNet-32: layer2s, layer3s; ImageNet family: layer3s, layer4s
    linears.{i}.weight [D, C] (cosine) / .weight [C, D] + .bias [C] (Linear) -> heads.{i}.*
    <stage>.*, linear.* | fc.*          single-expert baselines (E = 1) -> experts.0 / heads.0
    expert_help_pred_hidden_fcs.{i}.*, expert_help_pred_fc(s).*   the router: returned apart

Block-level names (conv1, bn1, ..., downsample.0/1) are the same on both sides, so mapping is a
renaming; every tensor's shape is checked before anything is loaded.
"""
from __future__ import annotations

import os
import pickle
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ride_fast.io import atomic_save
from ride_fast.models.batched import to_per_expert
from ride_fast.models.factory import create_model
from ride_fast.models.ride import RIDENet

ROUTER_PREFIX = "expert_help_pred"  # expert_help_pred_hidden_fcs.{i}, expert_help_pred_fc(s)
_WRAPPER_PREFIXES = ("module.", "backbone.")
_SINGLE_HEADS = ("linear", "fc")
_MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """An original checkpoint does not fit the ride_fast model it is loaded into."""


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _state_dict_of(checkpoint: Any) -> Mapping[str, Any]:
    """The state dict inside a raw original checkpoint ({'state_dict': ..., 'config': ...}) or itself."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a checkpoint dict or a state_dict, got {type(checkpoint).__name__}")
    inner = checkpoint.get("state_dict")
    if isinstance(inner, Mapping):
        return inner
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise TypeError(
            "expected an original RIDE checkpoint (a dict with a 'state_dict' entry) or a state_dict of tensors; "
            f"got a dict whose entries {not_tensors[:_MAX_LISTED]} are not tensors"
        )
    return checkpoint


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more


def _head_shape(weight: Tensor, has_bias: bool) -> tuple[int, int]:
    """(D, C) of a classifier weight: nn.Linear stores [C, D], NormedLinear [D, C]."""
    return (int(weight.shape[1]), int(weight.shape[0])) if has_bias else (int(weight.shape[0]), int(weight.shape[1]))


def load_original_state_dict(model: RIDENet, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Load original-RIDE weights into `model` so that its logits equal the original's.

    `state_dict` may be the raw checkpoint (with its 'state_dict' entry) or the state dict itself,
    with or without `module.` / `backbone.` prefixes. Raises CheckpointMismatchError (a
    ValueError) naming the expert-count difference, missing and unexpected keys and mismatched
    shapes; loads nothing in that case. Returns {"loaded": number of tensors loaded,
    "router": {original router key: tensor}} (router weights are not part of a RIDENet).
    """
    if getattr(model, "batched", False):  # a BatchedRIDENet: load its per-expert twin, then regroup
        twin = to_per_expert(model)
        info = load_original_state_dict(twin, state_dict)
        model.load_state_dict(twin.state_dict())
        return info
    source = {_strip_prefixes(k): v for k, v in _state_dict_of(state_dict).items()}
    stage_names: tuple[str, ...] = tuple(getattr(model.experts[0], "stage_names", ()))
    if not stage_names:
        raise TypeError(f"{type(model.experts[0]).__name__} declares no stage_names; cannot map original keys")
    target = model.state_dict()
    trunk_roots = {k.split(".")[1] for k in target if k.startswith("trunk.")}

    mapped, router, indexed, single = _map_original_keys(source, stage_names, trunk_roots)
    # Expert count first: it explains most other mismatches at once.
    _check_expert_count(indexed, single, stage_names, model.num_experts)

    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [f"{orig} -> {new}" for new, (orig, _) in mapped.items() if new not in target]
    mismatched = [
        f"{orig} -> {new}: checkpoint {list(value.shape)} vs model {list(target[new].shape)}"
        for new, (orig, value) in mapped.items()
        if new in target and tuple(value.shape) != tuple(target[new].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit {model.name} (model_args {model.model_args}):"]
        lines += [_listing(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
        lines += _hints(model, mapped)
        raise CheckpointMismatchError("\n  ".join(lines))

    loadable = {new: value for new, (_, value) in mapped.items()}
    result = model.load_state_dict(loadable, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys), result
    return {"loaded": len(loadable), "router": router}


def _map_original_keys(source: Mapping[str, Tensor], stage_names: tuple[str, ...], trunk_roots: set[str]):
    """Original key -> ride_fast key: (mapped {ride_fast key: (original key, tensor)}, router
    {original router key: tensor}, indexed {original ModuleList name: expert indices seen},
    single {single-expert (E = 1) names seen})."""
    router: dict[str, Tensor] = {}
    mapped: dict[str, tuple[str, Tensor]] = {}  # ride_fast key -> (original key, tensor)
    indexed: dict[str, set[int]] = {}  # original ModuleList name -> expert indices seen
    single: set[str] = set()  # single-expert (E = 1) names seen
    per_expert = re.compile(r"^(?P<list>(?:%s)s|linears)\.(?P<i>\d+)\.(?P<rest>.+)$" % "|".join(map(re.escape, stage_names)))
    for key, value in source.items():
        if key.startswith(ROUTER_PREFIX):
            router[key] = value
            continue
        root, _, rest = key.partition(".")
        m = per_expert.match(key)
        if m:
            name, i = m["list"], int(m["i"])
            indexed.setdefault(name, set()).add(i)
            new = f"heads.{i}.{m['rest']}" if name == "linears" else f"experts.{i}.{name[:-1]}.{m['rest']}"
        elif root in stage_names and root not in trunk_roots:
            single.add(root)
            new = f"experts.0.{key}"
        elif root in _SINGLE_HEADS:
            single.add(root)
            new = f"heads.0.{rest}"
        else:
            new = f"trunk.{key}"
        mapped[new] = (key, value)
    return mapped, router, indexed, single


def _check_expert_count(indexed: dict[str, set[int]], single: set[str], stage_names: tuple[str, ...], num_experts: int) -> None:
    """CheckpointMismatchError when the checkpoint's expert count (or layout) is not the model's."""
    if indexed and single:
        raise CheckpointMismatchError(
            f"the checkpoint mixes per-expert ({', '.join(sorted(indexed))}) and single ({', '.join(sorted(single))}) "
            "stages or classifiers (e.g. the original's share_layer3=True), which ride_fast does not model"
        )
    if indexed:
        name = next((f"{s}s" for s in reversed(stage_names) if f"{s}s" in indexed), "linears")
        ckpt_experts = max(max(ix) for ix in indexed.values()) + 1
        where = f"{name}.0..{ckpt_experts - 1}"
    else:
        ckpt_experts, where = (1, "single-expert layout") if single else (0, "no expert stages")
    if ckpt_experts != num_experts:
        hint = f"; create the model with num_experts={ckpt_experts}" if ckpt_experts else ""
        raise CheckpointMismatchError(
            f"the checkpoint has {ckpt_experts} experts ({where}) but the model has {num_experts}{hint}"
        )


def _hints(model: RIDENet, mapped: Mapping[str, tuple[str, Tensor]]) -> list[str]:
    """Plain-language guesses at the create_model argument that would make the checkpoint fit."""
    entry = mapped.get("heads.0.weight")
    if entry is None:
        return []
    has_bias = "heads.0.bias" in mapped
    hints = []
    if has_bias == model.model_args.get("use_norm", True):
        kind = "nn.Linear classifiers (with bias)" if has_bias else "cosine classifiers (NormedLinear, no bias)"
        hints.append(f"hint: the checkpoint has {kind}: create the model with use_norm={not has_bias}")
    d, c = _head_shape(entry[1], has_bias)
    if c != model.num_classes:
        hints.append(f"hint: the checkpoint has {c} classes: create the model with num_classes={c}")
    if d != model.feature_dim:
        hints.append(
            f"hint: the checkpoint's experts have feature width D={d}, the model's D={model.feature_dim}: "
            f"check reduce_dimension (now {model.model_args.get('reduce_dimension')}) and the model name"
        )
    return hints


# --- reading and writing files ---------------------------------------------------------------


class _Missing:
    """Stand-in for a class that the original checkpoint pickled but that cannot be imported here
    (e.g. the original trainer's ConfigParser): keeps whatever state it was given."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Missing":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<unavailable {type(self).__qualname__}>"


# What the unpickler may resolve: tensor/storage rebuilders and plain containers. Anything else the
# original trainer pickled (its ConfigParser, a logger, ...) becomes an inert stand-in, so loading a
# foreign checkpoint never calls arbitrary code.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
}


def _is_safe_global(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module in ("torch._utils", "torch") and name.startswith("_rebuild"):
        return True
    if module == "torch" and (name.endswith("Storage") or name in ("float32", "float16", "bfloat16", "float64", "int64", "uint8")):
        return True
    return module.startswith("numpy") and name.startswith("dtype")


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _is_safe_global(module, name):
            return super().find_class(module, name)
        return type(f"{module}.{name}", (_Missing,), {})


_tolerant_pickle = types.ModuleType("ride_fast_tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler  # type: ignore[attr-defined]
_tolerant_pickle.load = pickle.load  # type: ignore[attr-defined]
_tolerant_pickle.loads = pickle.loads  # type: ignore[attr-defined]


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """torch.load on CPU: weights_only=True first; if the file holds other Python objects (the
    original trainer pickles its config), warn and unpickle with an allow-list: tensors and
    containers load, every other global becomes an inert stand-in (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal falls through to the full unpickler
        first_error = exc
    warnings.warn(
        f"{path} holds Python objects besides tensors (the original RIDE trainer saves its config), so "
        f"torch.load(weights_only=True) refused it ({type(first_error).__name__}: {str(first_error).splitlines()[0] if str(first_error) else ''}). "
        "Reading it with a restricted unpickler: tensors and containers load, every other object becomes an inert stand-in.",
        stacklevel=2,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
    except Exception as exc:
        raise RuntimeError(f"could not read {path} as a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc


def convert_original_checkpoint(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    model_name: str,
    num_classes: int,
    num_experts: int,
    reduce_dimension: bool = True,
    use_norm: bool = True,
) -> dict[str, Any]:
    """Convert an original RIDE checkpoint file into a ride_fast one.

    Writes {"model": state_dict, "model_args": {...}, "router": {original router key: tensor}}
    atomically to dst_path; `create_model(**model_args)` rebuilds the network. Returns
    {"path", "loaded", "router_keys", "model_args"}.
    """
    model = create_model(model_name, num_classes=num_classes, num_experts=num_experts, reduce_dimension=reduce_dimension, use_norm=use_norm)
    checkpoint = load_checkpoint_file(src_path)
    try:
        info = load_original_state_dict(model, checkpoint)
    except (CheckpointMismatchError, TypeError) as exc:
        raise type(exc)(f"{src_path}: {exc}") from exc
    dst = atomic_save({"model": model.state_dict(), "model_args": model.model_args, "router": info["router"]}, dst_path)
    return {"path": str(dst), "loaded": info["loaded"], "router_keys": sorted(info["router"]), "model_args": model.model_args}
