"""Atomic file writes, and what a file that cannot be read looks like (a leaf module: any layer may use it).

A crash, a kill or a full disk during a write leaves the previous file whole, never a truncated one:
write a temporary file in the same folder, flush and fsync it, rename it over the target, fsync
the folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class WriteError(OSError):
    """A file that cannot be written; the message names it, the reason and, where it can, the fix."""


def _write_error(path: Path, err: OSError) -> WriteError:
    if isinstance(err, IsADirectoryError) or path.is_dir():
        why = "it is a folder; give a file path"
    elif isinstance(err, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in path.parents if os.path.lexists(p) and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else err.strerror or str(err)
    elif isinstance(err, PermissionError):
        why = "permission denied; choose a folder you can write to"
    else:
        why = err.strerror or str(err)
    return WriteError(f"cannot write {path}: {why}")


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise
    with contextlib.suppress(OSError):  # make the rename durable where folders can be fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically."""
    import torch

    return _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def json_ready(obj):
    """`obj` with numpy values as Python ones, paths as strings and NaN / inf as None (JSON null)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_text(data, indent: int | None = None) -> str:
    """Standard JSON (no NaN token: an undefined value, such as the accuracy of an empty split, is null)."""
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda fh: fh.write(text), "w")


def file_kind(path: str | os.PathLike) -> str:
    """What a file looks like from its first 4 KiB, for the message when torch.load cannot read it:
    "empty", "zip" (torch.save's format: damaged or truncated, if it does not load), "pickle"
    (protocol 2 or later, also torch.save's legacy format), "text" or "binary" (anything else)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if b"\x00" in head:
        return "binary"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return "text" if err.start >= len(head) - 3 else "binary"  # a character cut at the end of the read is still text
    return "text"


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out `fig`, write it atomically (format from the suffix: .png, .pdf, .svg) and close it."""
    path = Path(path)
    fig.tight_layout()
    try:
        return _atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png"), "wb")
    finally:
        pyplot().close(fig)


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 epoch', '3 epochs' (`words`: the plural when it is not word + 's')."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"
