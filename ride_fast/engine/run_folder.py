"""A run's folder (train.out_dir): which files make a run, and the guard that keeps two runs apart.

A new run into a folder that holds another run's files stops before touching anything and names
the choices (`--resume auto`, a new `train.out_dir`, `--overwrite`); with overwrite, only the run's
own files go, anything else in the folder stays.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ride_fast.engine.monitor import info

# what a run writes into train.out_dir, and what the later commands write beside its checkpoints there
RUN_FILES = (
    "config.yaml", "config_resume_*.yaml", "metrics.jsonl", "train.log", "*.pt", "tensorboard",
    "per_class_accuracy.json", "per_class_accuracy.png",
    "routed_config.yaml", "routed_eval.json", "routed_usage.png",  # ride-fast route (routed.pt: *.pt)
    "*_test_eval.json", "*_test_usage.png", "*_test_sweep.json", "*_test_sweep.png",  # ride-fast eval of a routed checkpoint
    "confusion.json", "confusion.png",  # ride-fast analyze confusion
    *(f"*_{method}.{ext}" for method in ("crt", "tau_norm", "cosine") for ext in ("json", "png")),  # analyze two-stage
)


UNSAVED_RUN_FILES = ("config.yaml", "train.log", "tensorboard")  # all a run writes before its first checkpoint


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders of a run in `out_dir` (RUN_FILES), sorted; [] for a fresh or missing folder."""
    out_dir = Path(out_dir)
    return sorted({p for pattern in RUN_FILES for p in out_dir.glob(pattern)}) if out_dir.is_dir() else []


def claim_run_folder(out_dir: Path, overwrite: bool, log: Callable[[str], None] = info) -> None:
    """Make `out_dir` ready for a new run. When it holds another run's files: without `overwrite`
    raise, naming the folder and the choices, with nothing touched; with it, delete those files
    (RUN_FILES only: other files in the folder stay)."""
    found = run_files(out_dir)
    if not found:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:6]) + (", ..." if len(found) > 6 else "")
    if not overwrite:
        cont = ("`ride-fast train ... --resume auto` continues it" if (Path(out_dir) / "last.pt").is_file()
                else "`--resume auto` finds no last.pt there to continue from")
        raise ValueError(f"train.out_dir {out_dir} holds another run ({names}); nothing was changed. Choose one: {cont}; "
                         f"set a new train.out_dir=...; or pass --overwrite to delete that run's files and start anew")
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log(f"deleted the previous run's files in {out_dir} to start anew ({names})")
