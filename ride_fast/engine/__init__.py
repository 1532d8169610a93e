"""Training loop, evaluation, checkpoints, schedules, stage 2; the only layer that joins models,
losses and data.

Modules, lowest first (each imports only the ones above it):

    runtime        device, autocast precision, seeds
    metrics        per-class and many / medium / few accuracy        schedule   the stage-1 lr multiplier
    distributed    torchrun process group, DDP, global BatchNorm
    checkpoint     reading and writing checkpoints; every checkpoint -> network load
    optim          the stage-1 optimizer and its canonical state
    step           one training step, BatchNorm guard, prefetch
    monitor        tqdm, TensorBoard, stop signals
    evaluate       the evaluation pass; `ride-fast eval` on a stage-1 checkpoint
    trainer        the stage-1 loop
    routed_cost    MACs and measured time per routed image
    threshold_curve  the accuracy-cost curve: one all-experts pass replayed at every threshold
    routed_eval    routed against all-experts evaluation, its report; `ride-fast eval` on a routed checkpoint
    calibration    held-out stage-2 data, threshold calibration
    stage2         router training; `ride-fast route`
"""
from ride_fast.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_model_from_checkpoint
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.optim import build_optimizer
from ride_fast.engine.runtime import resolve_amp, resolve_device
from ride_fast.engine.schedule import lr_multiplier
from ride_fast.engine.step import TrainStep
from ride_fast.engine.trainer import Trainer

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
