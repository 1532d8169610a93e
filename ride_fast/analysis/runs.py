"""Many stage-1 trainings, resumable and optionally in parallel processes.

One `RunSpec` = one training run in its own folder (the Trainer's checkpoints, config.yaml,
metrics.jsonl, plus data.json describing the training set). A run whose `last.pt` holds the final
epoch is skipped; one with an earlier `last.pt` continues from it; a folder trained with another
config is an error (reusing it would silently mix experiments).

With `workers > 1` the runs go to a pool of spawned processes, each with
cpu_count // workers torch threads; on a machine with several GPUs, runs are shared out over them
round-robin (cuda:0, cuda:1, ...).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ride_fast.config import (
    Config,
    config_diff,
    config_from_dict,
    config_to_dict,
    load_config,
    update,
)
from ride_fast.engine import CheckpointError, Trainer, load_checkpoint
from ride_fast.engine.monitor import info, setup_logging
from ride_fast.io import atomic_write_text, plural

FINAL = "last.pt"


@dataclass
class RunSpec:
    """One training run: its config (train.out_dir is the run folder) and its data.

    `train_set` / `test_set` None: the run builds `cfg.data` itself. `data_info` is written to
    data.json (e.g. which long-tailed draw the training set is)."""

    name: str
    cfg: Config
    train_set: object = None
    test_set: object = None
    data_info: dict = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def final_checkpoint(self) -> Path:
        return self.out_dir / FINAL


def run_state(spec: RunSpec) -> tuple[str, int]:
    """("done" | "partial" | "new", last finished epoch) of a run folder.

    Raises ValueError when the folder holds a run of a different config."""
    stored = spec.out_dir / "config.yaml"
    if stored.is_file():
        diff = _config_diff(load_config(stored), spec.cfg)
        if diff:
            raise ValueError(
                f"{spec.out_dir} holds a run with another config ({'; '.join(diff[:5])}); "
                "use another --out-dir or delete that folder"
            )
    if not spec.final_checkpoint.is_file():
        return "new", 0
    try:
        epoch = int(load_checkpoint(spec.final_checkpoint).get("epoch", 0))
    except CheckpointError:
        return "partial", 0  # unreadable: Trainer.resume falls back to the newest readable epoch_*.pt
    return ("done" if epoch >= spec.cfg.train.epochs else "partial"), epoch


def _config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ (progress / logging keys ignored)."""
    ignore = {"train.progress", "train.log_interval", "train.device", "analysis"}
    return [f"{key}: {x!r} there, {y!r} now" for key, x, y in config_diff(a, b)
            if key not in ignore and key.split(".")[0] not in ignore]


def train_run(spec: RunSpec, log: Callable[[str], None] = info) -> Path:
    """Train one run to its last epoch (resuming a partial one); returns its final checkpoint."""
    state, _ = run_state(spec)
    if state == "done":
        log(f"{spec.name}: done already ({spec.final_checkpoint})")
        return spec.final_checkpoint
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    if spec.data_info:
        atomic_write_text(json.dumps(spec.data_info, indent=2), spec.out_dir / "data.json")
    start = time.perf_counter()
    # "new": no checkpoint to continue from, and run_state checked that any config.yaml there is this run's
    trainer = Trainer(spec.cfg, train_set=spec.train_set, test_set=spec.test_set, log=lambda s: log(f"{spec.name}: {s}"),
                      overwrite=state == "new")
    if state == "partial":
        trainer.resume(spec.final_checkpoint)
    trainer.fit()
    log(f"{spec.name}: trained in {time.perf_counter() - start:.1f} s -> {spec.final_checkpoint}")
    return spec.final_checkpoint


def _worker(spec_dict: dict, device: str | None, threads: int) -> str:
    """Process-pool entry: rebuild the spec, set threads and device, train."""
    torch.set_num_threads(threads)
    cfg = config_from_dict(spec_dict["cfg"])
    if device is not None:
        cfg = update(cfg, train={"device": device})
    spec = RunSpec(spec_dict["name"], cfg, spec_dict["train_set"], spec_dict["test_set"], spec_dict["data_info"])
    setup_logging()  # a spawned process: its messages to its stdout, and to each run's train.log
    return str(train_run(spec))


def _devices(cfg: Config, n: int) -> list[str | None]:
    """Round-robin GPU per run when the config trains on CUDA and several GPUs are visible."""
    if cfg.train.device not in ("auto", "cuda") or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return [None] * n
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(n)]


def train_runs(specs: list[RunSpec], *, workers: int = 1, log: Callable[[str], None] = info) -> list[Path]:
    """Train every run that is not done; returns their final checkpoints (in the order of `specs`)."""
    todo = []
    for i, s in enumerate(specs):  # also checks every folder's config before anything trains
        if run_state(s)[0] == "done":
            log(f"{s.name}: done already, skipped")
        else:
            todo.append((i, s))
    done = len(specs) - len(todo)
    if done:  # a re-run: say what is left to compute
        left = f"training {', '.join(s.name for _, s in todo)}" if todo else "nothing left to train"
        log(f"{plural(done, 'run')} of {len(specs)} done already (skipped); {left}")
    if workers <= 1 or len(todo) <= 1:
        for _, s in todo:
            train_run(s, log)
        return [s.final_checkpoint for s in specs]
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    devices = _devices(specs[0].cfg, len(todo))
    log(f"training {len(todo)} runs in {workers} processes ({threads} torch threads each)")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads / CUDA
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {}
        for (i, s), dev in zip(todo, devices):
            payload = {"name": s.name, "cfg": config_to_dict(s.cfg), "train_set": s.train_set, "test_set": s.test_set,
                       "data_info": s.data_info}
            futures[pool.submit(_worker, payload, dev, threads)] = s
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                fut.result()
            except Exception as err:  # name the run that failed; finished runs keep their checkpoints
                pool.shutdown(wait=True, cancel_futures=True)
                raise RuntimeError(f"{spec.name} ({spec.out_dir}) failed: {str(err).strip() or 'its worker process stopped without a message'}") from err
    return [s.final_checkpoint for s in specs]
