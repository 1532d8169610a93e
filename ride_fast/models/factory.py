"""`create_model`: a registered RIDE network, its arguments checked, per-expert or batched.

    create_model(name, num_classes=100, num_experts=3, reduce_dimension=True, use_norm=True,
                 batched=False) -> RIDENet (batched: a BatchedRIDENet, experts as grouped convs)

`create_model(**model.model_args)` rebuilds any network it returned (a batched one's model_args
carry batched=True). Names come from the registry (ride_fast.models.registry).
"""
from __future__ import annotations

from ride_fast.config import MAX_EXPERTS, MIN_EXPERTS  # the one expert range, checked by the config too
from ride_fast.models.batched import to_batched
from ride_fast.models.registry import model_entrypoint
from ride_fast.models.ride import RIDENet


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
    """Build a registered RIDE network (see list_models()); raise ValueError on bad arguments.

    batched=True returns a BatchedRIDENet (all experts as one grouped network, same outputs and,
    for the same seed, the same initial weights as the per-expert network).
    """
    build = model_entrypoint(name)
    num_classes = _check_int("num_classes", num_classes)
    num_experts = _check_int("num_experts", num_experts)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not MIN_EXPERTS <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in {MIN_EXPERTS}..{MAX_EXPERTS}, got {num_experts}")
    if not isinstance(batched, bool):
        raise ValueError(f"batched must be true or false, got {batched!r}")
    model = build(num_classes=num_classes, num_experts=num_experts, reduce_dimension=bool(reduce_dimension), use_norm=bool(use_norm))
    return to_batched(model) if batched else model


__all__ = ["MAX_EXPERTS", "MIN_EXPERTS", "create_model"]
