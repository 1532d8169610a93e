"""Training loop, evaluation, checkpoints, schedules; the only layer that joins models, losses and data."""
from ride_fast.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_model_from_checkpoint
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.schedule import lr_multiplier
from ride_fast.engine.runtime import resolve_amp, resolve_device
from ride_fast.engine.trainer import Trainer, TrainStep, build_optimizer

__all__ = [
    "CheckpointError",
    "SplitAccuracy",
    "TrainStep",
    "Trainer",
    "atomic_save",
    "build_optimizer",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "lr_multiplier",
    "per_class_accuracy",
    "resolve_amp",
    "resolve_device",
    "split_accuracy",
]
