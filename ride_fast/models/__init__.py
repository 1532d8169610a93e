"""RIDE networks: a shared trunk, E expert branches and their cosine heads, and a registry.

Shape legend: B images, E experts, C classes, D expert feature width.

    create_model(name, num_classes, num_experts, reduce_dimension=True, use_norm=True,
                 batched=False) -> RIDENet (batched: a BatchedRIDENet, experts as grouped convs)
    RIDENet.forward(x [B, 3, h, w]) -> RIDEOutput(logits [B, C], expert_logits [E, B, C],
                                                  features [E, B, D])
    RIDENet.forward_trunk(x) -> trunk_out;  RIDENet.forward_expert(i, trunk_out) -> ([B, C], [B, D])
    load_original_state_dict / convert_original_checkpoint: weights of the original RIDE code
    to_batched / to_per_expert, batched_state_dict / per_expert_state_dict: the two layouts
    register_model / list_models / model_entrypoint: the registry the families register into

Modules, from the leaves up: output, heads, layout, registry (import nothing of models) < ride
(RIDENet) < resnet, resnet_cifar (families, registering their builders) < batched_blocks <
batched (BatchedRIDENet) < factory (create_model) < convert (original-code checkpoints).
"""
# The model families: importing them registers their builders (ride_fast.models.registry).
from ride_fast.models import resnet, resnet_cifar  # noqa: F401  (registration)
from ride_fast.models.batched import BatchedRIDENet, to_batched, to_per_expert
from ride_fast.models.convert import (
    CheckpointMismatchError,
    convert_original_checkpoint,
    load_checkpoint_file,
    load_original_state_dict,
)
from ride_fast.models.factory import MAX_EXPERTS, MIN_EXPERTS, create_model
from ride_fast.models.heads import CosineHead, NormedLinear
from ride_fast.models.layout import batched_state_dict, is_batched_layout, is_per_expert_layout, per_expert_state_dict
from ride_fast.models.output import RIDEOutput
from ride_fast.models.registry import MODELS, is_model, list_models, model_entrypoint, register_model
from ride_fast.models.ride import ExpertBranch, RIDENet

__all__ = [
    "BatchedRIDENet",
    "MAX_EXPERTS",
    "MIN_EXPERTS",
    "MODELS",
    "CheckpointMismatchError",
    "CosineHead",
    "ExpertBranch",
    "NormedLinear",
    "RIDENet",
    "RIDEOutput",
    "batched_state_dict",
    "convert_original_checkpoint",
    "create_model",
    "is_batched_layout",
    "is_model",
    "is_per_expert_layout",
    "list_models",
    "load_checkpoint_file",
    "load_original_state_dict",
    "model_entrypoint",
    "per_expert_state_dict",
    "register_model",
    "to_batched",
    "to_per_expert",
]
