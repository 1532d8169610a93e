"""Model registry: name -> builder. A leaf: it imports no model.

Every model family registers its builders into it, as timm does:

    @register_model("resnet32")                 # or bare @register_model: the function's name
    def resnet32(num_classes, num_experts, reduce_dimension=True, use_norm=True) -> RIDENet: ...

and `ride_fast.models` imports every family, so importing the package fills the registry.
A builder takes (num_classes, num_experts, reduce_dimension, use_norm) and returns a RIDENet whose
`model_args` rebuild it. `create_model` (ride_fast.models.factory) checks the arguments and builds
from here; the tests in tests/models iterate `list_models()`, so a registered builder is tested too.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

Builder = Callable[..., Any]  # (num_classes, num_experts, reduce_dimension, use_norm) -> RIDENet

MODELS: dict[str, Builder] = {}


def register_model(name: str | Builder | None = None) -> Any:
    """Decorator adding a builder to MODELS under `name` (default: the function's name)."""

    def wrap(fn: Builder, key: str | None = None) -> Builder:
        key = key or fn.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is already registered")
        MODELS[key] = fn
        return fn

    if callable(name):  # used bare: @register_model
        return wrap(name)
    return lambda fn: wrap(fn, name)


def is_model(name: str) -> bool:
    """Whether `name` is a registered model."""
    return name in MODELS


def model_entrypoint(name: str) -> Builder:
    """The builder registered under `name`; ValueError naming the closest valid names if none."""
    if name not in MODELS:
        valid = sorted(MODELS)
        close = difflib.get_close_matches(str(name).lower(), valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(valid)}.")
    return MODELS[name]


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


__all__ = ["MODELS", "Builder", "is_model", "list_models", "model_entrypoint", "register_model"]
