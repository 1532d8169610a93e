"""Bias/variance of long-tailed classifiers over independently drawn training sets (the paper's Fig. 1a).

Shape legend: R runs (training sets), N test images, C classes.

    predictions  [R, N]  int   the class each run's model predicts for each test image
    labels       [N]     int
    votes        [N, C]  int   how many runs predict class c for image n

For test image n (Domingos' 0-1 loss decomposition, as in the RIDE paper):

    main[n]      = argmax_c votes[n, c]           the most frequent prediction over runs; ties go to
                                                  the smallest class index (deterministic, label-blind)
    bias[n]      = 1[main[n] != labels[n]]        0-1 bias
    variance[n]  = mean_r 1[pred[r, n] != main[n]]  share of runs disagreeing with the main prediction
    accuracy[n]  = mean_r 1[pred[r, n] == labels[n]]

Each is averaged per class, then per split (many / medium / few: the mean over the split's classes,
like the accuracies of ride_fast.engine.metrics) and overall (the mean over test images). Bias and
variance are fractions in [0, 1]; accuracy is in percent.

The experiment (`run_bias_variance`): the full training data of an in-memory data set (mnist_lt,
cifar10_lt, cifar100_lt: every non-test image) is the pool; each run r draws, per class c,
n_c images without replacement from the pool with the same long-tailed profile
n_c = int(n_max * (1/f)^(c/(C-1))), n_max = head_fraction * (smallest pool class), so the sets differ
even in the head class (the paper: 20 sets of CIFAR-100, 300 of the 500 images for class 0). Run r
of every method uses the same draw (a paired comparison) and training seed train.seed + r, so the
variance covers both the sample and the training randomness. The test set is the data set's
balanced test set, the same for every run. Models are read from each run's last epoch.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ride_fast.analysis.common import (
    SPLIT_NAMES,
    collect_outputs,
    eval_loader,
    write_json,
)
from ride_fast.analysis.runs import RunSpec, train_runs
from ride_fast.config import Config, ConfigError, update
from ride_fast.data import (
    ArrayDataset,
    build_datasets,
    long_tail_counts,
    split_of_classes,
)
from ride_fast.engine import load_model_from_checkpoint, resolve_device
from ride_fast.engine.monitor import info
from ride_fast.io import plural, pyplot, save_figure

TIE_RULE = "ties between equally frequent predictions go to the smallest class index"
POOL_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")

# Method presets: overlays on the base recipe (which sets data, schedule and loss options).
METHOD_PRESETS: dict[str, dict] = {
    "ce": {"model": {"num_experts": 1, "reduce_dimension": False, "use_norm": False}, "loss": {"name": "ce"}},
    "cb_ce": {"model": {"num_experts": 1, "reduce_dimension": False, "use_norm": False}, "loss": {"name": "cb_ce"}},
    "focal": {"model": {"num_experts": 1, "reduce_dimension": False, "use_norm": False}, "loss": {"name": "focal"}},
    "ldam": {"model": {"num_experts": 1, "reduce_dimension": False, "use_norm": True}, "loss": {"name": "ldam"}},  # LDAM-DRW
    "ride": {"model": {"num_experts": 3, "reduce_dimension": True, "use_norm": True}, "loss": {"name": "ride"}},
}


# ---------------------------------------------------------------------------------------------
# the decomposition


@dataclass
class BiasVariance:
    """The decomposition of one method's predictions (see the module docstring)."""

    main_prediction: np.ndarray  # [N] int
    bias: np.ndarray  # [N] float 0/1
    variance: np.ndarray  # [N] float in [0, 1]
    accuracy: np.ndarray  # [N] percent of runs right
    per_class: dict[str, np.ndarray]  # "bias" / "variance" / "accuracy" -> [C] (nan: class absent from the test set)
    splits: dict[str, dict[str, float]]  # "many" / "medium" / "few" / "overall" -> {"bias", "variance", "accuracy"}
    run_accuracy: np.ndarray  # [R] percent: each run's accuracy over the test images

    def as_dict(self) -> dict:
        return {**{s: dict(v) for s, v in self.splits.items()},
                "per_class": {k: v.tolist() for k, v in self.per_class.items()},
                "run_accuracy": self.run_accuracy.tolist()}


def decompose(predictions, labels, class_counts, num_classes: int | None = None) -> BiasVariance:
    """0-1 bias and variance per image, class, split and overall from a [R, N] prediction table.

    class_counts: [C] training images per class (defines the splits; the test set is usually balanced).
    """
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if preds.ndim != 2:
        raise ValueError(f"predictions must be a table [runs, images], got shape {preds.shape}")
    R, N = preds.shape
    if R < 1 or N < 1:
        raise ValueError(f"need at least one run and one image, got predictions of shape {preds.shape}")
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape [{N}] (one per image of the prediction table), got {labels.shape}")
    if not (np.issubdtype(preds.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
        raise TypeError(f"predictions and labels must be integer class indices, got {preds.dtype} and {labels.dtype}")
    C = int(num_classes or len(class_counts))
    if len(class_counts) != C:
        raise ValueError(f"class_counts has {len(class_counts)} entries for {C} classes")
    for name, arr in (("predictions", preds), ("labels", labels)):
        if arr.min() < 0 or arr.max() >= C:
            raise ValueError(f"{name} hold class {int(arr.min() if arr.min() < 0 else arr.max())}, outside 0..{C - 1}")
    votes = np.zeros((N, C), dtype=np.int64)
    np.add.at(votes, (np.broadcast_to(np.arange(N), (R, N)), preds), 1)
    main = votes.argmax(1)  # first maximum: the smallest class index among ties
    bias = (main != labels).astype(np.float64)
    variance = (preds != main[None]).mean(0)
    right = preds == labels[None]  # [R, N]
    accuracy = 100.0 * right.mean(0)

    per_image = {"bias": bias, "variance": variance, "accuracy": accuracy}
    total = np.bincount(labels, minlength=C).astype(np.float64)
    per_class = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key, values in per_image.items():
            per_class[key] = np.bincount(labels, weights=values, minlength=C) / total
    masks = split_of_classes(class_counts)
    splits: dict[str, dict[str, float]] = {}
    for split in SPLIT_NAMES:
        sel = masks[split] & (total > 0)
        splits[split] = {k: float(v[sel].mean()) if sel.any() else float("nan") for k, v in per_class.items()}
    splits["overall"] = {k: float(v.mean()) for k, v in per_image.items()}
    return BiasVariance(main, bias, variance, accuracy, per_class, splits, 100.0 * right.mean(1))


# ---------------------------------------------------------------------------------------------
# independent long-tailed training sets


@dataclass
class LongTailPool:
    """The full training data of a data set, its balanced test set, and the drawing profile."""

    pool: ArrayDataset  # every non-test image
    test_set: ArrayDataset
    counts: list[int]  # [C] images per class in each drawn training set

    def draw(self, run: int, seed: int = 0) -> ArrayDataset:
        """Training set of run `run`: per class, counts[c] pool images without replacement."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(run)])
        labels = self.pool.labels.numpy()
        picks = []
        for c, n in enumerate(self.counts):
            idx = np.flatnonzero(labels == c)
            picks.append(np.sort(rng.choice(idx, size=n, replace=False)))
        idx = torch.from_numpy(np.concatenate(picks))
        return dataclasses.replace(self.pool, images=self.pool.images[idx], labels=self.pool.labels[idx],
                                   name=f"{self.pool.name}/draw{run}")


def long_tail_pool(data_cfg, head_fraction: float = 0.6, pool: tuple | None = None) -> LongTailPool:
    """The pool of `data_cfg`'s data set and the profile of its drawn training sets.

    `pool` = (full training data, test set) replaces building them (tests, other data)."""
    if pool is None:
        if data_cfg.name not in POOL_DATASETS:
            raise ValueError(f"bias-variance draws training sets from the full training data of an in-memory data set "
                             f"({', '.join(POOL_DATASETS)}); data.name={data_cfg.name} has no such pool")
        pool = build_datasets(dataclasses.replace(data_cfg, imbalance_factor=1.0))  # imbalance 1: every non-test image
    full, test = pool
    if not 0 < head_fraction <= 1:
        raise ValueError(f"analysis.head_fraction must lie in (0, 1], got {head_fraction}")
    per_class = np.bincount(full.labels.numpy(), minlength=full.num_classes)
    n_max = int(head_fraction * per_class.min())
    counts = long_tail_counts(n_max, full.num_classes, data_cfg.imbalance_factor)
    if min(counts) < 1:
        raise ValueError(f"the profile n_max={n_max}, imbalance {data_cfg.imbalance_factor:g} leaves class "
                         f"{int(np.argmin(counts))} without images; raise analysis.head_fraction or lower data.imbalance_factor")
    return LongTailPool(full, test, counts)


# ---------------------------------------------------------------------------------------------
# methods


def method_config(base: Config, method: str) -> tuple[str, Config]:
    """(name, config) of a method: a preset (ce, cb_ce, focal, ldam, ride, ride2..ride8) applied
    over `base`, or a recipe YAML (its keys override `base`; the name is the file's stem)."""
    if method.endswith((".yaml", ".yml")):
        path = Path(method)
        if not path.is_file():
            raise ConfigError(f"method recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        try:
            return path.stem, update(base, **data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    match = re.fullmatch(r"ride(\d+)", method)
    if match:
        preset = {**METHOD_PRESETS["ride"], "model": {**METHOD_PRESETS["ride"]["model"], "num_experts": int(match.group(1))}}
    elif method in METHOD_PRESETS:
        preset = METHOD_PRESETS[method]
    else:
        close = difflib.get_close_matches(method, list(METHOD_PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; presets: {', '.join(METHOD_PRESETS)}, rideE (E experts), or a recipe .yaml")
    return method, update(base, **preset)


def run_specs(cfg: Config, methods, runs: int, out_dir: str | Path, lt: LongTailPool) -> dict[str, list[RunSpec]]:
    """One RunSpec per (method, run): folder OUT/method/run_RRR, the run's draw, seed train.seed + r,
    evaluation only at the last epoch (the models are read from last.pt)."""
    out_dir = Path(out_dir)
    specs: dict[str, list[RunSpec]] = {}
    draws = [lt.draw(r, cfg.data.seed) for r in range(runs)]
    for method in methods:
        name, mcfg = method_config(cfg, method)
        if name in specs:
            raise ValueError(f"method {name!r} is listed twice")
        specs[name] = []
        for r, train_set in enumerate(draws):
            rcfg = update(mcfg, train={"out_dir": str(out_dir / name / f"run_{r:03d}"), "seed": cfg.train.seed + r,
                                       "eval_every": max(1, mcfg.train.epochs), "keep_last": 1})
            info = {"run": r, "draw_seed": [int(cfg.data.seed), r], "data": cfg.data.name, "train_class_counts": lt.counts,
                    "train_images": len(train_set)}
            specs[name].append(RunSpec(f"{name} run {r}", rcfg, train_set, lt.test_set, info))
    return specs


@torch.no_grad()
def test_predictions(checkpoint: str | Path, test_set, cfg: Config) -> np.ndarray:
    """[N] predicted classes (mean logits of all experts) of a checkpoint on `test_set`."""
    device = resolve_device(cfg.train.device)
    model, _ = load_model_from_checkpoint(checkpoint, device)
    out = collect_outputs(model, eval_loader(cfg, test_set, device), amp=cfg.train.amp)
    return out.logits.argmax(1).numpy()


@dataclass
class BiasVarianceReport:
    runs: int
    methods: dict[str, BiasVariance]
    data: dict
    checkpoints: dict[str, list[str]]
    seconds: float

    def as_dict(self) -> dict:
        return {"runs": self.runs, "tie_rule": TIE_RULE,
                "units": {"bias": "fraction of test images", "variance": "fraction of runs", "accuracy": "percent"},
                "data": self.data, "methods": {k: v.as_dict() for k, v in self.methods.items()},
                "checkpoints": self.checkpoints, "seconds": self.seconds}

    def summary(self) -> str:
        head = f"{'method':<12}{'split':<9}{'bias':>7}{'var.':>7}{'acc. %':>9}"
        lines = [head, "-" * len(head)]
        for name, bv in self.methods.items():
            for split in (*SPLIT_NAMES, "overall"):
                s = bv.splits[split]
                lines.append(f"{name:<12}{split:<9}{s['bias']:>7.3f}{s['variance']:>7.3f}{s['accuracy']:>9.1f}")
        return "\n".join(lines)


def run_bias_variance(
    cfg: Config,
    *,
    runs: int | None = None,
    methods=None,
    workers: int | None = None,
    out_dir: str | Path | None = None,
    pool: tuple | None = None,
    log: Callable[[str], None] = info,
) -> BiasVarianceReport:
    """Train every (method, run) not trained yet, decompose, write bias_variance.json and .png in out_dir.

    Defaults come from cfg.analysis (runs, methods, workers, out_dir, head_fraction)."""
    a = cfg.analysis
    runs = a.runs if runs is None else runs
    methods = list(a.methods if methods is None else methods)
    workers = a.workers if workers is None else workers
    out_dir = Path(out_dir or a.out_dir)
    if runs < 2:
        raise ValueError(f"bias-variance needs at least 2 runs (--runs), got {runs}")
    if not methods:
        raise ValueError("no method to compare: pass --methods ce,ldam,ride (or set analysis.methods)")
    start = time.perf_counter()
    lt = long_tail_pool(cfg.data, a.head_fraction, pool)
    counts = np.asarray(lt.counts)
    log(f"bias-variance: {runs} long-tailed draws of {counts.sum()} images ({counts.max()} -> {counts.min()} per class) "
        f"from a pool of {len(lt.pool)}; {len(lt.test_set)} test images; methods {', '.join(methods)}; out {out_dir}")
    specs = run_specs(cfg, methods, runs, out_dir, lt)
    train_runs([s for group in specs.values() for s in group], workers=workers, log=log)
    checkpoints = plural(sum(map(len, specs.values())), "checkpoint")
    log(f"bias-variance: predicting the {len(lt.test_set):,} test images with the {checkpoints}, then 0-1 bias and variance per split")

    results, ckpts = {}, {}
    labels = lt.test_set.labels.numpy()
    for name, group in specs.items():
        preds = np.stack([test_predictions(s.final_checkpoint, lt.test_set, s.cfg) for s in group])
        results[name] = decompose(preds, labels, counts)
        ckpts[name] = [str(s.final_checkpoint) for s in group]
    masks = split_of_classes(counts)
    data = {"name": cfg.data.name, "imbalance_factor": cfg.data.imbalance_factor, "head_fraction": a.head_fraction,
            "pool_size": len(lt.pool), "train_class_counts": counts.tolist(), "test_size": len(lt.test_set),
            "splits": {k: np.flatnonzero(v).tolist() for k, v in masks.items()}}
    report = BiasVarianceReport(runs, results, data, ckpts, time.perf_counter() - start)
    write_json(report.as_dict(), out_dir / "bias_variance.json")
    plot_bias_variance(report, out_dir / "bias_variance.png")
    log(report.summary())
    log(f"wrote {out_dir / 'bias_variance.json'} and {out_dir / 'bias_variance.png'} ({report.seconds:.0f} s)")
    return report


def plot_bias_variance(report: BiasVarianceReport, path: str | Path) -> Path:
    """Three panels (bias, variance, accuracy); per split, one bar per method side by side (Fig. 1a)."""
    plt = pyplot()
    splits = [*SPLIT_NAMES, "overall"]
    names = list(report.methods)
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8), dpi=120)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(splits))
    for ax, key, label in zip(axes, ("bias", "variance", "accuracy"), ("0-1 bias", "0-1 variance", "mean accuracy (%)")):
        for i, name in enumerate(names):
            vals = [report.methods[name].splits[s][key] for s in splits]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(vals), width, label=name)
        ax.set_xticks(x, splits)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if key != "accuracy":
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report.data['name']}: bias and variance over {report.runs} long-tailed training sets", fontsize=10)
    return save_figure(fig, path)
