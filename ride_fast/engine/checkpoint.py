"""Checkpoints: written atomically, read back with `weights_only=True` (no arbitrary unpickling).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
    model, optimizer, scaler (state dicts), scheduler (lr and epoch), epoch (last finished), step
    (> 0: written inside the next epoch, with its metric sums in epoch_sums), best_metric,
    best_epoch, config (the resolved config as a dict), model_args (for `create_model(**model_args)`),
    class_counts, rng (torch/numpy/python), loader (the training loader's seed, epoch and batch).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ride_fast.models import create_model
from ride_fast.io import atomic_save, atomic_write_text  # noqa: F401  (re-exported)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what is needed."""


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True; a missing, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle with arbitrary objects, not a torch file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a ride_fast checkpoint (no 'model' entry)")
    return ckpt


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", batched: bool | None = None):
    """(model, checkpoint dict) from a ride_fast checkpoint, model in eval mode. batched: build a
    BatchedRIDENet (True) or the per-expert network (False); None: as the checkpoint's model_args say."""
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{path}: no 'model_args' entry; was it written by `ride-fast convert` or the trainer?")
    args = dict(ckpt["model_args"]) if batched is None else {**ckpt["model_args"], "batched": batched}
    model = create_model(**args)
    model.load_state_dict(ckpt["model"])  # either layout
    return model.to(device).eval(), ckpt
