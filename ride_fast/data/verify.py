"""Probe the files of a data set: the checks that training runs before it starts (fail fast) and
that `ride-fast data check` (ride_fast.data.check) reports, with the same messages.

Shape legend: N images, C classes.

Problems found (each names the list file and line, or the image path):
- malformed list lines, labels out of range, evaluation classes unknown to training (readers);
- missing images, empty files, files that are not images, truncated or undecodable images;
- classes with no training image.

Image verification levels: "none"; "header" (the default before training: the file exists, starts
like an image, and a JPEG/PNG ends with its end marker; a suspect file is then decoded to confirm,
so the check is exact for truncation yet reads only a few KB of a healthy file); "decode" (every
image fully decoded with PIL: what `data check` does by default).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ride_fast.data.dataset import DataError, Problem

log = logging.getLogger("ride_fast.data")

VERIFY_LEVELS = ("none", "header", "decode")
_TAIL = 4096  # bytes at the end of a file searched for the JPEG / PNG end marker
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
)


def image_format(head: bytes) -> str | None:
    """The image format a file's first bytes announce, or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    return None


def decode_reason(err: Exception) -> str:
    """Why PIL could not decode an image, in words: its message (the first line) without the exception's
    class name; an unknown format or a damaged header said as such."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL reads, or its header is damaged"
    text = str(err).strip()
    return text.splitlines()[0] if text else "the decoder stopped without a reason"


def decode_problem(path: str) -> tuple[str, str] | None:
    """Decode the whole image with PIL: None if it is readable, else (kind, reason)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "unreadable", f"image of size {im.width}x{im.height}"
    except FileNotFoundError:
        return "missing", "image not found"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return "unreadable", f"cannot decode ({decode_reason(err)})"
    return None


def header_problem(path: str) -> tuple[str, str] | None:
    """Cheap check (see the module docstring): None if the image looks whole, else (kind, reason)."""
    try:
        size = os.stat(path).st_size
        if size == 0:
            return "unreadable", "empty file"
        with open(path, "rb") as fh:
            head = fh.read(16)
            fmt = image_format(head)
            if fmt is None:
                return "unreadable", f"not an image (starts with {head[:8]!r})"
            if fmt in ("JPEG", "PNG"):
                fh.seek(max(0, size - _TAIL))
                tail = fh.read()
                marker = b"\xff\xd9" if fmt == "JPEG" else b"IEND"
                if marker not in tail:  # truncated, or trailing bytes after the end: decode to tell
                    return decode_problem(path)
    except FileNotFoundError:
        return "missing", "image not found"
    except OSError as err:
        return "unreadable", f"cannot read ({err.strerror or err})"
    return None


def verify_images(files: list[str], level: str = "header", threads: int = 16, progress=None) -> dict[int, tuple[str, str]]:
    """{index: (kind, reason)} of the images that are missing or unreadable at `level`.

    Runs `threads` threads (file I/O and PIL decoding release the GIL). `progress(done, total)` is
    called now and then when given.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"data.verify_images: {level!r} is not one of {list(VERIFY_LEVELS)}")
    if level == "none" or not files:
        return {}
    check = header_problem if level == "header" else decode_problem
    chunk = 256
    starts = range(0, len(files), chunk)

    def run(start: int):
        return [(start + k, r) for k, f in enumerate(files[start : start + chunk]) if (r := check(f)) is not None]

    bad: dict[int, tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for n, found in enumerate(pool.map(run, starts), 1):
            bad.update(found)
            if progress is not None:
                progress(min(n * chunk, len(files)), len(files))
    return bad


def image_problems(dataset, split: str, level: str, threads: int = 16, progress=None) -> list[Problem]:
    """Problems of the images of a file data set (none for data sets held in memory)."""
    files = getattr(dataset, "files", None)
    if files is None:
        return []
    bad = verify_images(files, level, threads, progress)
    out = []
    for i in sorted(bad):
        kind, reason = bad[i]
        where = dataset.where(i)
        text = f"{where}: {reason}: {files[i]}" if where != files[i] else f"{files[i]}: {reason}"
        out.append(Problem(kind, text, index=i, split=split))
    return out


def empty_class_problems(dataset, after_skip: int = 0) -> list[Problem]:
    counts = dataset.class_counts()
    names = getattr(dataset, "class_names", None)
    out = []
    for c in np.flatnonzero(counts == 0):
        label = f"class {c}" + (f" ({names[c]})" if names and c < len(names) else "")
        extra = f" after leaving out {after_skip} unreadable images" if after_skip else ""
        out.append(Problem("empty_class", f"{dataset.name}: {label} has no training image{extra}", split="train"))
    return out


def validate(train, test, list_problems: list[Problem], *, level: str = "header", skip_bad_images: bool = False,
             threads: int = 16):
    """The fail-fast checks of training: returns (train, test) with unreadable images left out when
    `skip_bad_images`, else raises DataError listing every problem (as `data check` prints them)."""
    problems = list(list_problems)
    img_train = image_problems(train, "train", level, threads)
    img_test = image_problems(test, "test", level, threads)
    problems += img_train + img_test
    skipped = 0
    if skip_bad_images and (img_train or img_test):
        for ds_name, found in (("train", img_train), ("test", img_test)):
            if not found:
                continue
            ds = train if ds_name == "train" else test
            drop = {p.index for p in found}
            kept = ds.subset([i for i in range(len(ds)) if i not in drop])
            if ds_name == "train":
                train = kept
            else:
                test = kept
            skipped += len(drop)
        first = (img_train + img_test)[0].message
        log.warning("data.skip_bad_images: left out %d unreadable or missing images (%d training, %d test); first: %s",
                    skipped, len(img_train), len(img_test), first)
        problems = [p for p in problems if not p.skippable]
    problems += empty_class_problems(train, len(img_train) if skip_bad_images else 0)
    if problems:
        name = train.name.split("/")[0] or "data"
        raise DataError(problems, f"{name}: the data set has problems; fix them, or run `ride-fast data check` for a report"
                        + ("" if skip_bad_images else " (data.skip_bad_images=true leaves out unreadable images)"))
    return train, test


__all__ = [
    "VERIFY_LEVELS",
    "decode_problem",
    "empty_class_problems",
    "header_problem",
    "image_format",
    "image_problems",
    "validate",
    "verify_images",
]
