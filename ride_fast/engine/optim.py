"""The stage-1 optimizer and its state in the checkpoint.

`build_optimizer`: SGD with momentum and Nesterov, one fused kernel per step where torch has one.
`canonical_optimizer_state` / `load_canonical_optimizer_state`: the optimizer state in the
parameter order and shapes of the per-expert layout, whatever model.batched is, so that a
checkpoint resumes with either layout (the network's own state dict is converted the same way by
models/batched.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ride_fast.engine.checkpoint import CheckpointError
from ride_fast.models import RIDENet, create_model
from ride_fast.models.layout import batched_state_dict, per_expert_state_dict


def fused_sgd_supported(device: torch.device) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and Nesterov; one fused kernel per step where torch has it (CUDA and the
    CPU; faster than foreach there), else foreach.

    The momentum buffers start as zeros instead of being created by the first step. The result is
    the same (momentum * 0 + grad = grad) and it keeps a skipped first step harmless: fused SGD given
    `found_inf` (the non-finite-loss guard, GradScaler) would otherwise leave uninitialised buffers.
    """
    kwargs = {}
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if fused_sgd_supported(device) else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )
    if cfg.momentum:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _per_expert_param_names(model: RIDENet) -> list[str]:
    """The parameter order of the per-expert layout of `model` (built on the meta device)."""
    if not getattr(model, "batched", False):
        return _param_names(model)
    args = {k: v for k, v in model.model_args.items() if k != "batched"}
    with torch.device("meta"):
        per = create_model(**args)
    return _param_names(per)


def _convert_optimizer_state(state: dict, src_names: list[str], dst_names: list[str], convert) -> dict:
    """Re-key an optimizer state dict (one param group over all parameters) from one parameter
    order to another, converting per-parameter tensors (momentum buffers) with `convert`, a state
    dict converter (batched_state_dict / per_expert_state_dict / identity)."""
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(src_names):
        raise CheckpointError(f"cannot convert an optimizer state with {len(groups)} param groups over "
                              f"{sum(len(g['params']) for g in groups)} parameters (expected one group of {len(src_names)})")
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            fields.setdefault(key, {})[src_names[int(idx)]] = value
    position = {n: i for i, n in enumerate(dst_names)}
    new_state: dict[int, dict] = {}
    for key, by_name in fields.items():
        for name, value in convert(by_name).items():
            new_state.setdefault(position[name], {})[key] = value
    group = dict(groups[0], params=list(range(len(dst_names))))
    return {"state": new_state, "param_groups": [group]}


def canonical_optimizer_state(optimizer: torch.optim.Optimizer, model: RIDENet) -> dict:
    """optimizer.state_dict() in the parameter order and shapes of the per-expert layout, with the
    lr a Python float (a captured step keeps it in a device tensor: engine/step.py)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    if not getattr(model, "batched", False):
        return state
    E = model.num_experts
    return _convert_optimizer_state(state, _param_names(model), _per_expert_param_names(model), lambda d: per_expert_state_dict(d, E))


#: param-group settings that say how the optimizer runs, not where training is: a resumed run keeps its own
IMPLEMENTATION_KEYS = ("fused", "foreach", "differentiable")


def load_canonical_optimizer_state(optimizer: torch.optim.Optimizer, model: RIDENet, state: dict) -> None:
    """The inverse of canonical_optimizer_state: load a per-expert-layout optimizer state.

    The optimizer keeps its implementation (IMPLEMENTATION_KEYS): `load_state_dict` would copy the
    saved run's, and a run resumed with another one (fused SGD on a GPU after a CPU run, say) would
    then step with the saved implementation while its TrainStep drives the built one."""
    if getattr(model, "batched", False):
        E = model.num_experts
        state = _convert_optimizer_state(state, _per_expert_param_names(model), _param_names(model), lambda d: batched_state_dict(d, E))
    own = {k: optimizer.param_groups[0][k] for k in IMPLEMENTATION_KEYS if k in optimizer.param_groups[0]}
    state = dict(state, param_groups=[{**group, **own} for group in state["param_groups"]])
    optimizer.load_state_dict(state)
