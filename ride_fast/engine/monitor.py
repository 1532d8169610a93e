"""What a run shows and hears: log messages, tqdm bars, TensorBoard events, stop signals.

Messages go through the stdlib logger `ride_fast` (`LOGGER`): `info` is the default `log` callable
of the engine, `warn` sends a warning through whatever `log` callable a caller passed.
`setup_logging` (the CLI: `--log-level`, `-v`, `-q`) prints them on stdout as before, with
"warning: " in front of warnings; `log_file` also writes them, with time and level, to a file
(`<train.out_dir>/train.log` of a run, rank 0).

`StopRequest` turns SIGTERM / SIGINT into a flag the loop reads at a step boundary (it saves a
checkpoint, then exits); `signal_at_from_env` reads the test hook RIDE_FAST_SIGNAL_AT (off by
default); `progress_bar`, `progress`, `tensorboard_writer` and `tensorboard_log` are optional
outputs that are None / pass-throughs / no-ops when switched off or not installed. Progress bars
show only on a terminal, and never with RIDE_FAST_PROGRESS=0 (the CLI's `--no-progress`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from ride_fast.io import plural

LOGGER = logging.getLogger("ride_fast")
LOGGER.addHandler(logging.NullHandler())  # a library: silent until setup_logging / log_file attach a handler
LOGGER.setLevel(logging.INFO)
LEVELS = ("debug", "info", "warning", "error")
PROGRESS_ENV = "RIDE_FAST_PROGRESS"


def info(message: str) -> None:
    """The default `log` callable of the engine (a message at level INFO)."""
    LOGGER.info(message)


def warn(log: Callable[[str], None], message: str) -> None:
    """A warning through `log`: a WARNING record when `log` is the logger's `info`, else "warning: ..." to `log`."""
    if log is info:
        LOGGER.warning(message)
    else:
        log(f"warning: {message}")


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _ConsoleHandler(logging.StreamHandler):
    """A StreamHandler on `stream`, or on whatever sys.stdout is when a message is written (None)."""

    def __init__(self, stream=None):
        super().__init__(stream)  # sets sys.stderr for None, through the setter below
        self._fixed = stream

    @property
    def stream(self):
        return self._fixed or sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream
        self._fixed = value


_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: a warning raised in ride_fast's own code is a message to the user ("warning: ..."
    through the logger, into train.log too), not a Python source line with a class name; others as Python shows them."""
    if file is None and Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        LOGGER.warning(str(message))
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def setup_logging(level: str = "info", stream=None) -> logging.Handler:
    """Messages of `ride_fast` at `level` and above to `stream` (default: sys.stdout at the time of each message),
    replacing an earlier console handler; warnings.warn from ride_fast's code becomes such a message."""
    warnings.showwarning = _show_warning
    if level not in LEVELS:
        raise ValueError(f"--log-level {level!r}: choose one of {', '.join(LEVELS)}")
    for h in [h for h in LOGGER.handlers if isinstance(h, _ConsoleHandler)]:
        LOGGER.removeHandler(h)
    handler = _ConsoleHandler(stream)
    handler.setFormatter(_ConsoleFormatter())
    handler.setLevel(level.upper())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(min(logging.INFO, handler.level))  # a log file still gets INFO under -q
    return handler


class _HeldRecords(logging.Handler):
    """Keeps the records of `ride_fast` at INFO and above, for a log file opened later (`log_file(earlier=...)`)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_records():
    """While open, the messages of `ride_fast` (shown as usual) are also kept; yields the list they go to.
    A run's messages from before its folder may be written to (a resume) reach train.log this way."""
    handler = _HeldRecords()
    LOGGER.addHandler(handler)
    try:
        yield handler.records
    finally:
        LOGGER.removeHandler(handler)


@contextlib.contextmanager
def log_file(path: Path, earlier: Iterable[logging.LogRecord] = ()):
    """While open, messages of `ride_fast` at INFO and above are appended to `path` with time and level;
    `earlier` records (from `held_records`) are written first, with their own times."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    for record in earlier:
        handler.handle(record)
    LOGGER.addHandler(handler)
    try:
        yield handler
    finally:
        LOGGER.removeHandler(handler)
        handler.close()


class StopRequest:
    """SIGTERM / SIGINT set a flag that the training loop reads at the next step boundary, so the
    run saves a checkpoint and exits cleanly (a scheduler's pre-emption, Ctrl-C). A second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = info):
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


def startup_summary(command: str, *, data: str, num_classes: int, train_images: int, test_images: int, loader: str,
                    device, amp: str, amp_setting: str, batch: int, world_size: int = 1, accumulate_steps: int = 1,
                    out: Path | str = "") -> str:
    """The lines `train` and `route` print first (rank 0): data, loader, device, precision, batch, output."""
    per_rank = batch // max(world_size, 1)
    parts = max(min(accumulate_steps, per_rank), 1)  # as engine/step.py splits it (tensor_split, empty parts dropped)
    small, large = per_rank // parts, -(-per_rank // parts)
    sizes = f"{small}" if small == large else f"{small}-{large}"
    micro = f", run as {parts} micro-batches of {sizes} (train.accumulate_steps)" if accumulate_steps > 1 else ""
    precision = {"none": "fp32"}.get(amp, amp) + (" (chosen by train.amp=auto)" if amp_setting == "auto" else "")
    ranks = plural(world_size, "rank")
    return "\n".join([
        f"{command}: data {data}, {num_classes} classes, {train_images:,} training and {test_images:,} test images, loader {loader}",
        f"  device {device}, precision {precision}, {ranks}",
        f"  batch {batch} per optimizer step, {per_rank} per rank{micro}",
        f"  output {out}",
    ])


def tensorboard_writer(out_dir: Path, enabled: bool, log: Callable[[str], None] = info):
    """A SummaryWriter under OUT_DIR/tensorboard when asked for; a warning when the tensorboard package is missing."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the tensorboard package
        warn(log, "train.tensorboard=true but the tensorboard package is not installed: no TensorBoard events are written "
                  "(pip install ride_fast[tensorboard], or set train.tensorboard=false)")
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


def progress_enabled(requested: bool = True) -> bool:
    """Whether to draw a progress bar: asked for, stderr is a terminal, and RIDE_FAST_PROGRESS is not 0."""
    return requested and os.environ.get(PROGRESS_ENV, "1") != "0" and sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar over `total` steps, or None when switched off (see progress_enabled)."""
    if not progress_enabled(enabled):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """`iterable` behind a tqdm bar (batches of an evaluation, epochs of a router...), or as it is when switched off."""
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    bar = progress_bar(total, desc, enabled)
    if bar is None:
        yield from iterable
        return
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
