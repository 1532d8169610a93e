"""Model registry: name -> builder, and `create_model` with argument checks.

Every builder takes (num_classes, num_experts, reduce_dimension, use_norm) and returns a RIDENet
whose `model_args` rebuild it: `create_model(**model.model_args)`; `create_model(batched=True)`
turns it into a BatchedRIDENet (whose model_args carry batched=True). Registering a builder here
also adds it to the parametrised tests in tests/models.
"""
from __future__ import annotations

import difflib
from typing import Callable

from ride_fast.models.resnet import resnet10, resnet50, resnext50_32x4d
from ride_fast.models.resnet_cifar import resnet32
from ride_fast.models.ride import RIDENet

Builder = Callable[..., RIDENet]

MIN_EXPERTS, MAX_EXPERTS = 1, 8

MODELS: dict[str, Builder] = {
    "resnet32": resnet32,  # CIFAR ResNet-32 (CIFAR-100-LT)
    "resnet10": resnet10,  # ImageNet-LT
    "resnet50": resnet50,  # ImageNet-LT, iNaturalist 2018
    "resnext50_32x4d": resnext50_32x4d,  # ImageNet-LT
}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to MODELS under `name`."""

    def wrap(fn: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return wrap


def _check_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def create_model(
    name: str,
    num_classes: int = 100,
    num_experts: int = 3,
    reduce_dimension: bool = True,
    use_norm: bool = True,
    batched: bool = False,
) -> RIDENet:
    """Build a registered RIDE network (see MODELS); raise ValueError on bad arguments.

    batched=True returns a BatchedRIDENet (all experts as one grouped network, same outputs and,
    for the same seed, the same initial weights as the per-expert network).
    """
    if name not in MODELS:
        valid = sorted(MODELS)
        close = difflib.get_close_matches(str(name).lower(), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(valid)}.")
    num_classes = _check_int("num_classes", num_classes)
    num_experts = _check_int("num_experts", num_experts)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not MIN_EXPERTS <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in {MIN_EXPERTS}..{MAX_EXPERTS}, got {num_experts}")
    if not isinstance(batched, bool):
        raise ValueError(f"batched must be true or false, got {batched!r}")
    model = MODELS[name](num_classes=num_classes, num_experts=num_experts, reduce_dimension=bool(reduce_dimension), use_norm=bool(use_norm))
    if batched:
        from ride_fast.models.batched import to_batched  # imports the blocks of every family

        model = to_batched(model)
    return model


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)
