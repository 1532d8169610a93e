"""`ride-fast data check`: read a data set as training would, collect every problem instead of
stopping at the first, and print them with the class-size statistics.

Shape legend: N images, C classes.

    report = check_data(cfg.data, level="decode")    # DataReport(name, train, test, problems, level)
    print(report.format())                           # sizes, problems, head-to-tail histogram, splits

The probes themselves (image_format, header_problem, decode_problem, verify_images, validate ...)
are in ride_fast.data.verify, shared with the fail-fast checks of training and the DALI loader;
they are importable from here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ride_fast.data.dataset import SPLITS, Problem, split_of_classes
from ride_fast.data.factory import build_datasets, is_file_dataset
from ride_fast.data.image_list import read_file_datasets
from ride_fast.data.verify import (
    VERIFY_LEVELS,
    decode_problem,
    empty_class_problems,
    header_problem,
    image_format,
    image_problems,
    validate,
    verify_images,
)


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
    if is_file_dataset(cfg.name):
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
