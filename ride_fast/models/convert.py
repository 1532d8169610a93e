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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ride_fast.io import atomic_save, file_kind
from ride_fast.models.batched import to_per_expert
from ride_fast.models.factory import create_model
from ride_fast.models.registry import model_entrypoint
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
    if isinstance(checkpoint.get("model"), Mapping) and "model_args" in checkpoint:
        raise TypeError("this is a ride_fast checkpoint already (it holds 'model' and 'model_args'), not the original code's: "
                        "`ride-fast eval --checkpoint` and `ride-fast route --checkpoint` read it as it is")
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
    stage_names, trunk_roots = _mapping_for(model)
    target = model.state_dict()

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


def _expert_count(indexed: dict[str, set[int]], single: set[str], stage_names: tuple[str, ...]) -> tuple[int, str]:
    """(experts in the checkpoint, where that is seen); CheckpointMismatchError for a mixed layout."""
    if indexed and single:
        raise CheckpointMismatchError(
            f"the checkpoint mixes per-expert ({', '.join(sorted(indexed))}) and single ({', '.join(sorted(single))}) "
            "stages or classifiers (e.g. the original's share_layer3=True), which ride_fast does not model"
        )
    if indexed:
        name = next((f"{s}s" for s in reversed(stage_names) if f"{s}s" in indexed), "linears")
        ckpt_experts = max(max(ix) for ix in indexed.values()) + 1
        return ckpt_experts, f"{name}.0..{ckpt_experts - 1}"
    return (1, "single-expert layout") if single else (0, "no expert stages")


def _check_expert_count(indexed: dict[str, set[int]], single: set[str], stage_names: tuple[str, ...], num_experts: int) -> None:
    """CheckpointMismatchError when the checkpoint's expert count (or layout) is not the model's."""
    ckpt_experts, where = _expert_count(indexed, single, stage_names)
    if ckpt_experts != num_experts:
        hint = f"; create the model with num_experts={ckpt_experts}" if ckpt_experts else ""
        raise CheckpointMismatchError(
            f"the checkpoint has {ckpt_experts} experts ({where}) but the model has {num_experts}{hint}"
        )


def _mapping_for(model: RIDENet) -> tuple[tuple[str, ...], set[str]]:
    """(expert stage names, trunk root names) of a model: what `_map_original_keys` needs."""
    stage_names: tuple[str, ...] = tuple(getattr(model.experts[0], "stage_names", ()))
    if not stage_names:
        raise TypeError(f"{type(model.experts[0]).__name__} declares no stage_names; cannot map original keys")
    return stage_names, {k.split(".")[1] for k in model.state_dict() if k.startswith("trunk.")}


def infer_model_args(state_dict: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """What an original checkpoint says about the network `model_name` it holds: {"num_classes",
    "num_experts", "reduce_dimension", "use_norm"} (from the classifier's shape and bias, the
    per-expert stage indices and the feature width), each with "<key>_source" naming the tensors
    it was read from. CheckpointMismatchError when the file cannot be such a network."""
    source = {_strip_prefixes(k): v for k, v in _state_dict_of(state_dict).items()}
    probes = {r: create_model(model_name, num_classes=2, num_experts=1, reduce_dimension=r) for r in (True, False)}
    stage_names, trunk_roots = _mapping_for(probes[True])
    mapped, _, indexed, single = _map_original_keys(source, stage_names, trunk_roots)
    experts, where = _expert_count(indexed, single, stage_names)
    head = mapped.get("heads.0.weight")
    if not experts or head is None:
        raise CheckpointMismatchError(
            f"no {model_name} weights: expected per-expert stages ({', '.join(f'{s}s.0' for s in stage_names)}) and "
            "classifiers (linears.0.weight), or one expert's (linear.weight / fc.weight); is --model right?")
    has_bias = "heads.0.bias" in mapped
    width, classes = _head_shape(head[1], has_bias)
    reduced = [r for r, probe in probes.items() if probe.feature_dim == width]
    if not reduced:
        raise CheckpointMismatchError(
            f"the checkpoint's classifier {head[0]} {list(head[1].shape)} has feature width {width}, but {model_name} has "
            f"{probes[True].feature_dim} (reduced) or {probes[False].feature_dim} (full width); is --model right?")
    head_source = f"{head[0]} {list(head[1].shape)}"
    return {"num_classes": classes, "num_classes_source": head_source,
            "num_experts": experts, "num_experts_source": where,
            "reduce_dimension": reduced[0], "reduce_dimension_source": f"feature width {width} of {head_source}",
            "use_norm": not has_bias, "use_norm_source": f"{head[0]} {'with' if has_bias else 'without'} a bias"}


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
    kind = file_kind(path)
    if kind not in ("zip", "pickle"):
        what = {"empty": "the file is empty", "text": "it is a text file"}.get(kind, "it is neither a zip archive nor a pickle")
        raise RuntimeError(f"{path} is not a PyTorch checkpoint: {what}; expected a file written by torch.save, such as the "
                           "original RIDE code's checkpoint-epochN.pth or model_best.pth")
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(first_error))
    warnings.warn(
        f"{path} holds Python objects besides tensors (the original RIDE trainer saves its config"
        + (f"; this file: {refused.group(1)}" if refused else "") + "), which torch.load(weights_only=True) does not read. "
        "Reading it with a restricted unpickler: tensors and containers load, every other object becomes an inert stand-in.",
        stacklevel=2,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
    except Exception:
        raise RuntimeError(f"{path}: cannot read this PyTorch checkpoint: "
                           + ("a damaged or truncated torch.save archive" if kind == "zip" else "a damaged or truncated pickle")
                           + " (a copy or a download that did not finish?)") from None


# the flags of `ride-fast convert` that can override what the file says
_FLAGS = {"num_classes": "--num-classes", "num_experts": "--num-experts", "reduce_dimension": "--[no-]reduce-dimension",
          "use_norm": "--linear"}


def convert_original_checkpoint(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    model_name: str,
    num_classes: int | None = None,
    num_experts: int | None = None,
    reduce_dimension: bool | None = None,
    use_norm: bool | None = None,
    overwrite: bool = False,
    check_router: Callable[[Mapping[str, Tensor], RIDENet], Any] | None = None,
) -> dict[str, Any]:
    """Convert an original RIDE checkpoint file into a ride_fast one.

    The classes, experts, width and head type come from the file (`infer_model_args`); an argument
    that is not None must agree with it (CheckpointMismatchError naming both otherwise). Writes
    {"model": state_dict, "model_args": {...}, "router": {original router key: tensor}}
    atomically to dst_path; `create_model(**model_args)` rebuilds the network. Returns
    {"path", "loaded", "router_keys", "model_args"}. dst_path must not be src_path, and must not
    exist unless `overwrite`.

    check_router(router weights, network), when the file holds router weights (stage 2): raises
    ValueError or KeyError if they do not fit the network (`ride-fast convert` passes
    `Router.from_original` with the network's sizes; this layer does not know the router). Every
    check runs before dst_path is written, so a refused file leaves dst_path as it was.
    """
    if os.path.realpath(dst_path) == os.path.realpath(src_path):
        raise ValueError(f"{dst_path} is the file to convert; give another destination (the original stays as it is)")
    if os.path.lexists(dst_path) and not overwrite:
        raise FileExistsError(f"{dst_path} exists already; choose another destination, or pass --overwrite to replace it")
    model_entrypoint(model_name)  # an unknown name is an error before the file is read
    checkpoint = load_checkpoint_file(src_path)
    try:
        found = infer_model_args(checkpoint, model_name)
        asked = {"num_classes": num_classes, "num_experts": num_experts, "reduce_dimension": reduce_dimension, "use_norm": use_norm}
        for key, value in asked.items():
            if value is not None and value != found[key]:
                raise CheckpointMismatchError(
                    f"{_FLAGS[key]} asks for {key}={value}, but the checkpoint has {key}={found[key]} "
                    f"({found[key + '_source']}); leave {_FLAGS[key]} out to take it from the file")
        model = create_model(model_name, **{key: found[key] for key in asked})
        info = load_original_state_dict(model, checkpoint)
        if info["router"] and check_router is not None:
            try:
                check_router(info["router"], model)
            except (ValueError, KeyError) as exc:
                why = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise CheckpointMismatchError(
                    f"its router weights (stage 2) do not fit the network ({model.num_experts} experts, feature width "
                    f"{model.feature_dim}, {model.num_classes} classes): {why}") from None
    except (CheckpointMismatchError, TypeError) as exc:
        raise type(exc)(f"{src_path}: {exc}") from exc
    dst = atomic_save({"model": model.state_dict(), "model_args": model.model_args, "router": info["router"]}, dst_path)
    return {"path": str(dst), "loaded": info["loaded"], "router_keys": sorted(info["router"]), "model_args": model.model_args}
