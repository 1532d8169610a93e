"""Validate a data set before a long run: the checks behind `ride-fast data check` and the
fail-fast checks of training (the same messages).

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
from dataclasses import dataclass, field

import numpy as np

from ride_fast.data.dataset import SPLITS, DataError, Problem, split_of_classes

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
        return "unreadable", f"cannot decode ({type(err).__name__}: {err})"
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


# ----------------------------------------------------------------------------------- report


@dataclass
class DataReport:
    """What `ride-fast data check` found."""

    name: str
    train: object  # ArrayDataset | ImageListDataset
    test: object
    problems: list[Problem] = field(default_factory=list)
    level: str = "none"

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 200, groups: int = 20) -> str:
        return format_report(self, max_problems, groups)


def check_data(cfg, level: str = "decode", threads: int = 16, progress=None) -> DataReport:
    """Read a data set as training would and collect every problem instead of stopping at them."""
    from ride_fast.data.factory import build_datasets, is_file_dataset

    if is_file_dataset(cfg.name):
        from ride_fast.data.image_list import read_file_datasets

        train, test, problems = read_file_datasets(cfg)
        problems += image_problems(train, "train", level, threads, progress)
        problems += image_problems(test, "test", level, threads, progress)
    else:
        train, test = build_datasets(cfg)
        problems, level = [], "none (held in memory)"
    problems += empty_class_problems(train)
    return DataReport(cfg.name, train, test, problems, level)


def _bar(value: float, top: float, width: int = 40) -> str:
    return "#" * max(1 if value > 0 else 0, round(width * value / top)) if top > 0 else ""


def format_report(report: DataReport, max_problems: int = 200, groups: int = 20) -> str:
    """A readable report: sizes, problems, class-size histogram head to tail, splits, imbalance."""
    train, test = report.train, report.test
    counts = train.class_counts()
    test_counts = test.class_counts()
    lines = [f"data set {report.name}: {train.num_classes} classes"]
    for split, ds in (("train", train), ("test", test)):
        src = getattr(ds, "source", "") or ""
        lines.append(f"  {split:<5} {len(ds):>10,} images" + (f"   from {src}" if src else ""))
    lines.append(f"  images verified: {report.level}")
    if report.problems:
        kinds: dict[str, int] = {}
        for p in report.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        lines.append(f"problems ({len(report.problems)}: {summary}):")
        lines += [f"  {p.message}" for p in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"  ... and {len(report.problems) - max_problems} more")
    else:
        lines.append("no problems found")

    order = np.argsort(-counts, kind="stable")
    ranked = counts[order]
    C = len(ranked)
    k = min(groups, C)
    lines.append(f"class sizes, head to tail (training images per class; {C} classes ranked, {k} groups):")
    top = float(ranked[0]) if C else 0.0
    for g in range(k):
        lo, hi = g * C // k, (g + 1) * C // k
        part = ranked[lo:hi]
        rank = f"{lo + 1}" if hi - lo == 1 else f"{lo + 1}-{hi}"
        span = f"{part[0]}" if part[0] == part[-1] else f"{part[0]}..{part[-1]}"
        lines.append(f"  classes {rank:>11}  {span:>12}  {_bar(float(part.mean()), top)}")

    masks = split_of_classes(counts)
    lines.append("splits by training count (many > 100, medium 20..100, few < 20):")
    for s in SPLITS:
        m = masks[s]
        n_train, n_test = int(counts[m].sum()), int(test_counts[m].sum())
        lines.append(f"  {s:<7}{int(m.sum()):>7} classes {n_train:>11,} train images {n_test:>10,} test images")
    nonzero = counts[counts > 0]
    if len(nonzero):
        lines.append(f"imbalance ratio: {int(nonzero.max())} / {int(nonzero.min())} = {nonzero.max() / nonzero.min():.1f}")
    return "\n".join(lines)


__all__ = [
    "VERIFY_LEVELS",
    "DataReport",
    "check_data",
    "decode_problem",
    "empty_class_problems",
    "format_report",
    "header_problem",
    "image_format",
    "image_problems",
    "validate",
    "verify_images",
]
