"""What a training run shows and hears: the tqdm bar, TensorBoard events, stop signals.

`StopRequest` turns SIGTERM / SIGINT into a flag the loop reads at a step boundary (it saves a
checkpoint, then exits); `signal_at_from_env` reads the test hook RIDE_FAST_SIGNAL_AT (off by
default); `progress_bar`, `tensorboard_writer` and `tensorboard_log` are optional outputs that are
None / no-ops when switched off or not installed.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path


class StopRequest:
    """SIGTERM / SIGINT set a flag that the training loop reads at the next step boundary, so the
    run saves a checkpoint and exits cleanly (a scheduler's pre-emption, Ctrl-C). A second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = print):
        self.requested: str | None = None
        self.log = log
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: saving a checkpoint at the next step boundary, then exiting (Ctrl-C again aborts)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


SIGNAL_AT_ENV = "RIDE_FAST_SIGNAL_AT"


def signal_at_from_env() -> tuple[int, int, signal.Signals] | None:
    """A test hook, off unless the environment variable RIDE_FAST_SIGNAL_AT=EPOCH:STEP:SIGNAL[:RANK]
    is set (e.g. 2:5:SIGKILL): the training process then sends itself SIGNAL right after step STEP
    (1-based) of epoch EPOCH, so tests of kills and pre-emption stop a run at a known point of an
    epoch instead of after a guessed delay. In a torchrun job every rank signals itself, or only
    rank RANK when given, and only in the job's first attempt (TORCHELASTIC_RESTART_COUNT 0), so
    the group that torchrun restarts runs to the end. Returns (epoch, step, signal) or None."""
    value = os.environ.get(SIGNAL_AT_ENV, "").strip()
    if not value:
        return None
    try:
        epoch, step, name, *rank = value.split(":")
        if len(rank) > 1:
            raise ValueError
        hook = int(epoch), int(step), signal.Signals[name.upper()]
        ranks = [int(r) for r in rank]
    except (ValueError, KeyError):
        raise ValueError(f"{SIGNAL_AT_ENV}={value!r}: expected EPOCH:STEP:SIGNAL or EPOCH:STEP:SIGNAL:RANK, "
                         "e.g. 2:5:SIGTERM") from None
    if ranks and int(os.environ.get("RANK", "0")) != ranks[0]:
        return None
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    return hook


def tensorboard_writer(out_dir: Path, enabled: bool):
    """A SummaryWriter under OUT_DIR/tensorboard when asked for and the tensorboard package is installed."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the tensorboard package
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def tensorboard_log(writer, record: dict) -> None:
    """One epoch's record (the metrics.jsonl line) as scalars: train/* and test/*, step = epoch."""
    if writer is None:
        return
    step = record["epoch"]
    for key in ("lr", "loss", "train_acc", "images_per_s", "data_wait_s", "nonfinite_steps"):
        writer.add_scalar(f"train/{key}", record[key], step)
    for key, value in record.get("test", {}).items():
        writer.add_scalar(f"test/{key}", value, step)
    writer.flush()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar over an epoch's steps, or None when switched off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
