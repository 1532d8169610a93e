"""Checkpoints: written atomically, read back with `weights_only=True` (no arbitrary unpickling).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:
    model, optimizer, scaler (state dicts), scheduler (lr and epoch), epoch (last finished), step
    (> 0: written inside the next epoch, with its metric sums in epoch_sums), best_metric,
    best_epoch, config (the resolved config as a dict), model_args (for `create_model(**model_args)`),
    class_counts, rng (the random generators: torch, CUDA, numpy, python; see `rng_state`), loader (the
    training loader's seed, epoch and batch).

A routed checkpoint (stage 2, kind ROUTED_KIND) holds the whole routed model: model + model_args
(the stage-1 network, per-expert layout), router_state + router_args, config (its router.threshold
is the threshold to route with, calibrated or not: the one place the checkpoint stores it),
class_counts, router_history, stage1_checkpoint and stage2 (the data options, held-out counts and
threshold calibration).

Every network read back from a checkpoint is built here (`network_from_checkpoint`), with one
check for the model_args that rebuild it.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ride_fast.config import Config, ModelConfig, config_diff, config_from_dict, config_to_dict, dump_config, update
from ride_fast.io import atomic_save, atomic_write_text, file_kind  # noqa: F401  (atomic_* re-exported)
from ride_fast.models import RIDENet, create_model, to_per_expert
from ride_fast.router import Router

ROUTED_KIND = "ride_fast.routed"

# keys that older checkpoints stored under another name: section -> {old key: key now}
RENAMED_KEYS = {"router": {"calibrate": "calibrate_threshold"}}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what is needed."""


# what every message about a file that is not a checkpoint says a checkpoint is
CHECKPOINT_FORMAT = ("A ride_fast checkpoint is a file written by `ride-fast train`, `ride-fast route` or `ride-fast convert`: "
                     "a torch.save dict with 'model' (the network's state dict) and 'model_args' (the arguments that rebuild "
                     "it), and after training also 'optimizer', 'epoch' and 'config'")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True; a missing, truncated or foreign file is a clear
    error that says what the file is and what a checkpoint is (CHECKPOINT_FORMAT)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        hint = f": name one of its checkpoints, e.g. {path / inside[0]} ({', '.join(inside[:4])})" if inside else \
            " and holds no .pt file: name a checkpoint file (best.pt, last.pt or routed.pt of a run's train.out_dir)"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what the file is
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # truncated zip, pickle with arbitrary objects, not a torch file at all
        kind = file_kind(path)
        if kind == "zip":
            raise CheckpointError(f"{path}: cannot read the checkpoint: it is a damaged or truncated torch.save archive (a copy "
                                  "or a write that did not finish); an older epoch_NNNN.pt beside it may be whole") from None
        raise CheckpointError(f"{path} is not a ride_fast checkpoint: {_UNREADABLE[kind]}. {CHECKPOINT_FORMAT}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a ride_fast checkpoint: {_what_the_object_is(ckpt)}. {CHECKPOINT_FORMAT}")
    return ckpt


# what a file torch.load(weights_only=True) refused is, by `file_kind`
_UNREADABLE = {
    "empty": "the file is empty",
    "pickle": ("it is a pickle holding Python objects besides tensors and plain containers, which are not loaded (nothing "
               "from the file is run); a checkpoint of the original RIDE code is such a file: "
               "`ride-fast convert SRC DST --model NAME` turns it into a ride_fast checkpoint"),
    "text": "it is a text file, not a torch.save file",
    "binary": "it is not a torch.save file (neither a zip archive nor a pickle)",
}


def _what_the_object_is(obj) -> str:
    """What a readable torch file that is not a checkpoint holds."""
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:8]]
        more = f" and {len(obj) - 8} more" if len(obj) > 8 else ""
        if "state_dict" in obj:
            return (f"it holds a dict with the keys {keys}{more} but no 'model', like a checkpoint of the original RIDE code: "
                    "`ride-fast convert SRC DST --model NAME` turns it into a ride_fast checkpoint")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return (f"it holds a bare state dict ({len(obj)} tensors, e.g. {keys[:3]}), not a dict with 'model' and "
                    "'model_args'; original RIDE weights convert with `ride-fast convert`")
        return f"it holds a dict with the keys {keys}{more} but no 'model'"
    if isinstance(obj, torch.Tensor):
        return f"it holds a single tensor of shape {list(obj.shape)}"
    return f"it holds a {type(obj).__name__}, not a dict"


def rng_state() -> dict:
    """The random generators' states (torch, CUDA, numpy, python) for a checkpoint.

    In a process group of several ranks every rank must call it (it gathers with all_gather_object):
    the flat keys hold rank 0's state, and "ranks" every rank's, in rank order, so each rank resumes
    its own streams. A single process stores its state under the flat keys alone.
    """
    local = _local_rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return {**states[0], "ranks": states}


def set_rng_state(state: dict, rank: int | None = None) -> bool:
    """Restore this process's generators from a checkpoint's `rng_state`; rank: this process's rank
    (None: its rank in the process group, 0 without one). Returns whether the state is this rank's own.

    A checkpoint written by one process (or by an older version, which stored one state) gives that
    state to every rank, as the ranks start from one seed (train.seed). A checkpoint of N ranks
    resumed by another number of ranks: rank r < N restores rank r's state; a rank r >= N, for
    which no state was saved, keeps its generators as seeded at start-up (and False is returned).
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ranks = state.get("ranks")
    if ranks:
        if rank >= len(ranks):
            return False
        state = ranks[rank]
    _set_local_rng_state(state)
    return True


def _local_rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }


def _set_local_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        # one state per GPU the saving process saw; a run may resume on fewer (or more) of them
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def stored_config(ckpt: dict) -> Config:
    """The config a checkpoint was written with (defaults for a converted original checkpoint, which
    has none; keys of older checkpoints under their current names)."""
    stored = {section: dict(values) if isinstance(values, dict) else values for section, values in (ckpt.get("config") or {}).items()}
    for section, renamed in RENAMED_KEYS.items():
        values = stored.get(section)
        if isinstance(values, dict):
            for old, new in renamed.items():
                if old in values:
                    value = values.pop(old)
                    values.setdefault(new, value)
    return config_from_dict(stored)


def checkpoint_config(ckpt: dict, overrides: dict | None = None) -> Config:
    """The run's own config (`stored_config`), then `overrides` (e.g. {"data": {"root": ...}});
    the architecture always comes from the checkpoint's model_args."""
    cfg = update(stored_config(ckpt), **(overrides or {}))
    return update(cfg, model=model_section(ckpt["model_args"])) if "model_args" in ckpt else cfg


# keys a resumed run may not change: they change the network's shape or which images it trains on
SHAPE_KEYS = ("model.name", "model.num_experts", "model.reduce_dimension", "model.use_norm", "model.num_classes", "data.name",
              "data.num_classes", "data.imbalance_factor", "data.seed", "data.train_list", "data.image_size")


def resume_changes(ckpt: dict, cfg: Config, source: str | Path) -> list[tuple[str, object, object]]:
    """(key, old, new) of every key `cfg` changes against the checkpoint's config; a change of a
    SHAPE_KEYS key is refused (ValueError naming it)."""
    if not isinstance(ckpt.get("config"), dict):
        return []
    changes = config_diff(stored_config(ckpt), cfg)
    refused = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes if key in SHAPE_KEYS]
    if refused:
        raise ValueError(f"cannot resume {source} with {'; '.join(refused)}: the run was trained with the old value, and "
                         f"{'this key changes' if len(refused) == 1 else 'these keys change'} the model or the data it trains "
                         "on; keep the checkpoint's value, or start a new run in another train.out_dir")
    return changes


def has_data_config(ckpt: dict) -> bool:
    """Whether the checkpoint stores the data config it was trained on (a converted original one does not)."""
    return isinstance(ckpt.get("config"), dict) and bool(ckpt["config"].get("data"))


def require_data(ckpt: dict, source: str | Path, overrides: dict | None, command: str) -> None:
    """Refuse a checkpoint without a data config when no data.* option says what to use: the
    defaults (MNIST-LT) would be scored or trained on without a word."""
    if not has_data_config(ckpt) and not (overrides or {}).get("data"):
        raise CheckpointError(
            f"{source} stores no data config (a converted original checkpoint has none), so `ride-fast {command}` cannot tell "
            "which data set it belongs to; pass the data options, e.g. data.name=cifar100_lt data.root=/path/to/cifar"
            + (" (or --config with a recipe that sets them)" if command == "route" else ""))


def check_data_classes(source: str | Path, network_classes: int, data_name: str, data_classes: int) -> None:
    """Refuse data whose class count differs from the checkpoint's network, naming both and the fix."""
    if network_classes != data_classes:
        raise ValueError(f"{source}: the network has {network_classes} classes but data {data_name} has {data_classes}; "
                         "pass the data the checkpoint was trained on (e.g. data.name=... data.root=...)")


def inapplicable_options(overrides: dict | None, applicable: set[str]) -> list[str]:
    """The dotted keys of `overrides` that neither a key nor a section of `applicable` covers."""
    out = []
    for section, values in (overrides or {}).items():
        for key in (values if isinstance(values, dict) else {None: values}):
            dotted = f"{section}.{key}" if key is not None else section
            if dotted not in applicable and section not in applicable:
                out.append(dotted)
    return out


def model_section(model_args: dict) -> dict:
    """The keys of a checkpoint's model_args that the config's model section holds."""
    keys = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in model_args.items() if k in keys}


def network_from_checkpoint(ckpt: dict, source: str | Path = "the checkpoint", *, device: str | torch.device = "cpu",
                            batched: bool | None = None, channels_last: bool = False) -> RIDENet:
    """The network of a checkpoint dict, in eval mode on `device`. batched: build a BatchedRIDENet
    (True) or the per-expert network (False); None: as the checkpoint's model_args say. `source`
    names the checkpoint in errors."""
    if "model_args" not in ckpt:
        raise CheckpointError(f"{source}: no 'model_args' entry to rebuild the network; "
                              "was it written by `ride-fast train`, `ride-fast route` or `ride-fast convert`?")
    args = dict(ckpt["model_args"]) if batched is None else {**ckpt["model_args"], "batched": batched}
    model = create_model(**args)
    model.load_state_dict(ckpt["model"])  # either layout
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", batched: bool | None = None,
                               channels_last: bool = False) -> tuple[RIDENet, dict]:
    """(model, checkpoint dict) from a ride_fast checkpoint, model in eval mode (see `network_from_checkpoint`)."""
    ckpt = load_checkpoint(path)
    return network_from_checkpoint(ckpt, path, device=device, batched=batched, channels_last=channels_last), ckpt


# ---------------------------------------------------------------------------------------------
# routed checkpoints (stage 2)


def routed_checkpoint(net: RIDENet, router: Router, cfg: Config, threshold: float, class_counts, history=(),
                      stage1_checkpoint: str = "", stage2: dict | None = None) -> dict:
    """The whole routed model as plain data (readable with weights_only=True); `threshold` is
    stored once, as the config's router.threshold (see the module docstring). The network is
    stored in the per-expert layout, like the trainer's checkpoints."""
    if getattr(net, "batched", False):
        net = to_per_expert(net)
    config = config_to_dict(cfg)
    config["router"]["threshold"] = float(threshold)
    return {
        "kind": ROUTED_KIND,
        "model": net.state_dict(),
        "model_args": dict(net.model_args),
        "router_state": router.state_dict(),
        "router_args": router.router_args,
        "config": config,
        "class_counts": [int(c) for c in class_counts],
        "router_history": [dataclasses.asdict(h) for h in history],
        "stage1_checkpoint": str(stage1_checkpoint),
        "stage2": dict(stage2 or {}),
    }


def is_routed_checkpoint(ckpt: dict) -> bool:
    """A ride_fast routed checkpoint, or a converted original one that carries router weights."""
    return "router_state" in ckpt or bool(ckpt.get("router"))


def router_from_checkpoint(ckpt: dict, num_classes: int) -> Router:
    """The router of a routed checkpoint (ride_fast's own or the original's converted weights)."""
    if "router_state" in ckpt:
        if "router_args" not in ckpt:
            raise CheckpointError("the checkpoint has router_state but no router_args to rebuild the router")
        router = Router(**ckpt["router_args"])
        router.load_state_dict(ckpt["router_state"])
        return router
    if ckpt.get("router"):
        return Router.from_original(ckpt["router"], num_classes)
    raise CheckpointError("the checkpoint holds no router (neither router_state nor converted original router weights)")


def load_routed_checkpoint(path: str | Path, device: str | torch.device = "cpu", channels_last: bool = False) -> tuple[RIDENet, Router, dict]:
    """(network, router, checkpoint dict) from a routed checkpoint, both modules in eval mode."""
    ckpt = load_checkpoint(path)
    net = network_from_checkpoint(ckpt, path, device=device, channels_last=channels_last)
    try:
        router = router_from_checkpoint(ckpt, net.num_classes)
    except (CheckpointError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return net, router.to(device).eval(), ckpt


def save_routed_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write a routed checkpoint atomically, and its config beside it (<stem>_config.yaml)."""
    path = Path(path)
    out = atomic_save(ckpt, path)
    atomic_write_text(dump_config(config_from_dict(ckpt["config"])), path.with_name(f"{path.stem}_config.yaml"))
    return out
