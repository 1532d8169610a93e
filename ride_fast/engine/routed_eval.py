"""Routed evaluation (docs/method.md §6): routed against all-experts inference on a test set.

The accuracy pass runs, per batch, all experts and the routed model, and gives accuracy for both,
the share of images that used exactly 1..E experts (overall and per many/medium/few split) and MACs
per routed image (trunk + used experts + evaluated routers, engine/routed_cost.py) against the
single-expert baseline of the same backbone. Time is measured after it, in a phase of its own
(`time_routed`: throughput at the evaluation batch, A B B A repeats, and batch-1 latency split by
experts used). `write_report` writes it as JSON and a usage plot; `evaluate_routed_checkpoint` is
`ride-fast eval` on a routed checkpoint, and with `sweep` the accuracy-cost curve of the test set
over every threshold (table, JSON, PNG).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ride_fast.data import SPLITS, build_datasets, build_loaders, split_of_classes
from ride_fast.engine.checkpoint import atomic_write_text, checkpoint_config, load_checkpoint, load_routed_checkpoint
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.routed_cost import RoutedCost, RoutedTiming, baseline_macs, routed_cost, time_routed
from ride_fast.engine.runtime import autocast_context, resolve_device
from ride_fast.io import pyplot, save_figure
from ride_fast.models import RIDENet
from ride_fast.router import Router, prefix_mean_logits, routed_forward


# Shape legend for the replay: N images, E experts, R = E - 1 routers, T candidate thresholds.


@dataclass
class RouterScores:
    """One all-experts pass over a labelled set: everything routing at any threshold needs.

    An image goes on after router i (1-based) when sigmoid(r_i) > t and it got that far, so it uses
    more than k experts exactly when t < min(p_1, ..., p_k) (`reach`): routing at any threshold is
    replayed from these arrays without running the network again.
    """

    probs: np.ndarray  # [R, N] float32: router i's probability on every image (after experts 1..i)
    right: np.ndarray  # [E, N] bool: the mean logits of experts 1..n predict the label
    labels: np.ndarray  # [N] int64
    num_classes: int

    @property
    def reach(self) -> np.ndarray:
        """[R, N] float32: min(p_1..p_k); an image uses more than k experts iff t < reach[k - 1]."""
        return np.minimum.accumulate(self.probs, axis=0)

    def experts_used(self, threshold: float) -> np.ndarray:
        """[N] experts each image uses at `threshold` (1..E), as routed inference decides."""
        return 1 + (self.reach > np.float32(threshold)).sum(0)


@torch.no_grad()
def score_routers(net: RIDENet, router: Router, loader, amp: str = "none") -> RouterScores:
    """Every router's probability and every prefix's correctness on every image of `loader`
    (one all-experts pass; the routers see what routed inference would show them)."""
    device = next(net.parameters()).device
    net.eval()
    router.eval()
    probs, right, labels = [], [], []
    for batch in loader:
        with autocast_context(device, amp):
            out = net(batch.images)
        means = prefix_mean_logits(out.expert_logits)  # [E, B, C] float32
        right.append((means.argmax(-1) == batch.labels).cpu())
        probs.append(torch.sigmoid(router.forward_all(out.features[:-1].float(), means[:-1]).float()).cpu())
        labels.append(batch.labels.cpu())
    if not labels:
        raise ValueError("score_routers: the loader yielded no images")
    return RouterScores(torch.cat(probs, 1).numpy(), torch.cat(right, 1).numpy(), torch.cat(labels).numpy(), net.num_classes)


@dataclass
class ThresholdCurve:
    """Routed accuracy and cost at candidate thresholds (T, highest threshold first), replayed
    from one all-experts pass. Accuracies are percent, the mean over the classes present.

    drop = all-experts accuracy - routed accuracy; drop_se is its standard error over the images:
    sqrt(sum_i w_i^2 |d_i|), d_i = (all experts right) - (routed right) on image i, w_i = 100 /
    (classes present x images of its class); with equal classes, 100 sqrt(b) / N, b = the images on
    which routed and all experts disagree in correctness (the paired, McNemar view).
    """

    thresholds: np.ndarray  # [T] descending
    accuracy: np.ndarray  # [T]
    drop: np.ndarray  # [T]
    drop_se: np.ndarray  # [T]
    mean_macs: np.ndarray  # [T] per image, routers included
    usage: np.ndarray  # [T, E] share of images that used exactly 1..E experts
    all_experts_accuracy: float
    num_images: int
    per_class: list[int]

    @property
    def mean_experts(self) -> np.ndarray:
        return self.usage @ np.arange(1, self.usage.shape[1] + 1)

    def point(self, i: int) -> dict:
        return {"threshold": float(self.thresholds[i]), "accuracy": float(self.accuracy[i]), "drop": float(self.drop[i]),
                "drop_se": float(self.drop_se[i]), "mean_experts": float(self.mean_experts[i]),
                "mean_macs": float(self.mean_macs[i]), "usage": [float(u) for u in self.usage[i]]}

    def points(self, max_points: int | None = None, keep=()) -> list[dict]:
        """The curve as a list of points; at most about `max_points` (evenly spaced, first,
        last and the indices in `keep` always kept)."""
        T = len(self.thresholds)
        idx = range(T)
        if max_points and T > max_points:
            idx = sorted({*np.linspace(0, T - 1, max_points).round().astype(int).tolist(), *keep})
        return [self.point(i) for i in idx]


def _float32_between(lo: float, hi: float) -> float:
    """A float32 threshold t with lo <= t < hi (the middle when float32 can hold it)."""
    t = np.float32((np.float64(lo) + np.float64(hi)) / 2)
    return float(t if lo <= t < hi else np.float32(lo))


def threshold_curve(scores: RouterScores, cost: RoutedCost, grid=None) -> ThresholdCurve:
    """Accuracy, drop (and its standard error), MACs and usage per threshold, from `scores`.

    grid=None: every threshold that changes some decision (one point per distinct value of
    `scores.reach`, each represented by a float32 threshold inside its interval, plus 1.0 and 0.0
    at the ends); else the thresholds of `grid` (in [0, 1]).
    Lowering t past reach[k - 1] of an image moves it from k to k + 1 experts: the events, sorted
    by that value, give every point by cumulative sums.
    """
    R, N = scores.probs.shape
    E = R + 1
    y = scores.labels
    counts = np.bincount(y, minlength=scores.num_classes)
    present = counts > 0
    w = 100.0 / (present.sum() * counts[y])  # [N]: class-mean accuracy in percent
    right = scores.right.astype(np.float64)  # [E, N]
    all_right = right[-1]
    macs = np.asarray([cost.macs_with(k) for k in range(1, E + 1)], dtype=np.float64)
    reach = np.nan_to_num(scores.reach.astype(np.float32), nan=-1.0)  # NaN (a zero feature) never goes on
    # events: image i moves from k to k + 1 experts when t drops below reach[k - 1, i]
    at = reach.reshape(-1)  # [R * N], row k - 1
    k = np.repeat(np.arange(1, E), N)  # experts before the move
    i = np.tile(np.arange(N), R)
    d_acc = w[i] * (right[k, i] - right[k - 1, i])
    d_var = w[i] ** 2 * (np.abs(all_right[i] - right[k, i]) - np.abs(all_right[i] - right[k - 1, i]))
    d_macs = (macs[k] - macs[k - 1]) / N
    order = np.argsort(-at, kind="stable")
    at = at[order]
    moves = np.zeros((len(order), E))
    moves[np.arange(len(order)), k[order] - 1] -= 1.0
    moves[np.arange(len(order)), k[order]] += 1.0
    start_acc = float((w * right[0]).sum())
    start_var = float((w ** 2 * np.abs(all_right - right[0])).sum())
    acc = np.concatenate([[start_acc], start_acc + np.cumsum(d_acc[order])])  # state after j events
    var = np.concatenate([[start_var], start_var + np.cumsum(d_var[order])])
    cost_t = np.concatenate([[macs[0]], macs[0] + np.cumsum(d_macs[order])])
    usage = np.concatenate([np.eye(E)[:1] * N, np.eye(E)[:1] * N + np.cumsum(moves, 0)]) / N
    if grid is None:
        values = np.unique(at[at > 0])[::-1]  # distinct reachable breakpoints, descending
        thresholds = [1.0, *(_float32_between(float(lo), float(hi)) for hi, lo in zip(values[:-1], values[1:])), 0.0]
    else:
        thresholds = sorted({float(t) for t in grid}, reverse=True)
        if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"calibration thresholds must lie in [0, 1], got {thresholds}")
    t32 = np.asarray(thresholds, dtype=np.float32)
    done = np.searchsorted(-at, -t32, side="left")  # events with reach > t (at is descending)
    all_acc = float((w * all_right).sum())
    acc_t = acc[done]
    return ThresholdCurve(np.asarray(thresholds, dtype=np.float64), acc_t, all_acc - acc_t, np.sqrt(np.maximum(var[done], 0.0)),
                          cost_t[done], usage[done], all_acc, int(N), counts.tolist())



@dataclass
class RoutedReport:
    """Routed against all-experts inference on a test set (percent accuracies, fractions of images)."""

    threshold: float
    num_images: int
    num_experts: int
    all_experts: SplitAccuracy
    routed: SplitAccuracy
    usage: dict[str, list[float]]  # split -> share of its images that used exactly 1..E experts
    mean_experts: dict[str, float]  # split -> mean experts per image
    mean_macs: float  # routed, per image: trunk + used experts + evaluated routers
    mean_macs_network: float  # the same without the routers (the paper's convention)
    all_experts_macs: int
    baseline_macs: int  # single expert, reduce_dimension=False, Linear head
    cost: RoutedCost  # MACs and parameters by part
    device: str = ""
    timing: RoutedTiming | None = None  # the timing phase (None when not measured)

    @property
    def ms_per_image(self) -> dict[str, float]:
        """Median ms per image at the evaluation batch ("routed", "all_experts"; NaN when not timed)."""
        return self.timing.ms_per_image if self.timing else {"routed": float("nan"), "all_experts": float("nan")}

    @property
    def macs_ratio(self) -> float:
        """Routed mean MACs per image / all experts' MACs per image."""
        return self.mean_macs / self.all_experts_macs

    @property
    def macs_ratio_to_baseline(self) -> float:
        return self.mean_macs / self.baseline_macs

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "num_images": self.num_images,
            "num_experts": self.num_experts,
            "accuracy": {"all_experts": self.all_experts.as_dict(), "routed": self.routed.as_dict()},
            "per_class_accuracy": {"all_experts": self.all_experts.per_class, "routed": self.routed.per_class},
            "expert_usage": {split: {str(k + 1): s for k, s in enumerate(shares)} for split, shares in self.usage.items()},
            "mean_experts_per_image": self.mean_experts,
            "macs": {
                "routed_mean_per_image": self.mean_macs,
                "routed_mean_per_image_without_routers": self.mean_macs_network,
                "all_experts_per_image": self.all_experts_macs,
                "single_expert_baseline_per_image": self.baseline_macs,
                "routed_ratio_to_baseline": self.macs_ratio_to_baseline,
                "routed_ratio_to_all_experts": self.macs_ratio,
                "all_experts_ratio_to_baseline": self.all_experts_macs / self.baseline_macs,
                "parts": self.cost.as_dict(),
            },
            "ms_per_image": self.ms_per_image,
            "timing": self.timing.as_dict() if self.timing else None,
            "device": self.device,
        }

    def summary(self) -> str:
        a, r = self.all_experts, self.routed
        usage = "  ".join(f"{k + 1}: {100 * s:.1f}%" for k, s in enumerate(self.usage["overall"]))
        per_split = "  ".join(f"{s} {self.mean_experts[s]:.2f}" for s in SPLITS)
        timing = [self.timing.summary()] if self.timing else []
        return "\n".join([
            f"{'':<13}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}{'GMACs/img':>11}{'ms/img':>9}",
            f"{'all experts':<13}{a.overall:>9.2f}{a.many:>8.2f}{a.medium:>8.2f}{a.few:>8.2f}"
            f"{self.all_experts_macs / 1e9:>11.4f}{self.ms_per_image['all_experts']:>9.3f}",
            f"{'routed':<13}{r.overall:>9.2f}{r.many:>8.2f}{r.medium:>8.2f}{r.few:>8.2f}"
            f"{self.mean_macs / 1e9:>11.4f}{self.ms_per_image['routed']:>9.3f}",
            f"threshold {self.threshold:g}; experts used: {usage}; mean experts per image: {per_split}, "
            f"overall {self.mean_experts['overall']:.2f}",
            f"routed MACs/img = {self.macs_ratio:.3f} x all experts, {self.macs_ratio_to_baseline:.3f} x the single-expert "
            f"baseline ({self.baseline_macs / 1e9:.4f} G); all experts = {self.all_experts_macs / self.baseline_macs:.3f} x",
            *timing,
        ])


@torch.no_grad()
def evaluate_routed(
    net: RIDENet,
    router: Router,
    loader,
    class_counts,
    *,
    image_size: int,
    threshold: float = 0.5,
    amp: str = "none",
    in_channels: int = 3,
    cost: RoutedCost | None = None,
    baseline: int | None = None,
    timing: bool = True,
    timing_images: int = 512,
    latency_images: int = 200,
    repeats: int = 5,
) -> RoutedReport:
    """Accuracy, expert usage, MACs and time per image of routed vs all-experts inference.

    `loader` yields Batch(images, labels) on the network's device (e.g. an evaluation
    InMemoryLoader); `class_counts` are the training counts that define the splits. `cost` and
    `baseline` (MACs) may be passed when already counted (fvcore tracing takes a while). After the
    accuracy pass, `timing` measures time on `timing_images` test images spread over the set, at the
    loader's batch (`time_routed`: `repeats` A B B A rounds, batch-1 latency on `latency_images` images).
    """
    device = next(net.parameters()).device
    net.eval()
    router.eval()
    C, E = net.num_classes, net.num_experts
    correct_all = torch.zeros(C, dtype=torch.long, device=device)
    correct_routed = torch.zeros_like(correct_all)
    total = torch.zeros_like(correct_all)
    usage = torch.zeros(C * E, dtype=torch.long, device=device)  # [class, experts used - 1]
    kept, kept_n, batch_size = [], 0, 0
    per_batch = -(-timing_images // max(len(loader), 1)) if timing else 0  # test sets are often sorted by class
    for batch in loader:
        x, y = batch.images, batch.labels
        batch_size = max(batch_size, x.shape[0])
        if kept_n < timing_images and per_batch:  # the timing phase reuses test images spread over the whole set
            take = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0], timing_images - kept_n), device=x.device).round().long()
            kept.append(x.index_select(0, take.unique()))
            kept_n += kept[-1].shape[0]
        with autocast_context(device, amp):
            logits_all = net(x).logits
            out = routed_forward(net, router, x, threshold=threshold)
        c, t = per_class_accuracy(logits_all.argmax(1), y, C)
        correct_all += c
        total += t
        correct_routed += per_class_accuracy(out.logits.argmax(1), y, C)[0]
        usage += torch.bincount(y * E + out.num_experts - 1, minlength=C * E)
    hist = usage.view(C, E).cpu().numpy().astype(np.float64)
    n_images = int(hist.sum())
    if n_images == 0:
        raise ValueError("evaluate_routed: the loader yielded no images")
    shares, means = usage_by_split(hist, class_counts)
    ks = np.arange(1, E + 1)
    cost = cost or routed_cost(net, router, image_size, in_channels)
    overall = np.asarray(shares["overall"])
    mean_macs = float(sum(overall[k - 1] * cost.macs_with(k) for k in ks))
    mean_macs_net = float(sum(overall[k - 1] * cost.macs_with(k, routers=False) for k in ks))
    timed = None
    if timing:
        timed = time_routed(net, router, torch.cat(kept), threshold=threshold, batch=batch_size, repeats=repeats,
                            latency_images=latency_images, amp=amp)
    return RoutedReport(
        threshold=float(threshold),
        num_images=n_images,
        num_experts=E,
        all_experts=split_accuracy(correct_all, total, class_counts),
        routed=split_accuracy(correct_routed, total, class_counts),
        usage=shares,
        mean_experts=means,
        mean_macs=mean_macs,
        mean_macs_network=mean_macs_net,
        all_experts_macs=cost.network.total_macs,
        baseline_macs=baseline or baseline_macs(net.model_args, image_size, in_channels),
        cost=cost,
        device=str(device) + ("" if device.type != "cpu" else f" ({torch.get_num_threads()} threads)"),
        timing=timed,
    )


def usage_by_split(hist: np.ndarray, class_counts) -> tuple[dict[str, list[float]], dict[str, float]]:
    """hist [C, E] (images of each class that used 1..E experts) -> per split ("overall" and
    many / medium / few of `class_counts`): the share of its images that used exactly 1..E experts,
    and the mean experts per image (NaN for a split without images)."""
    C, E = hist.shape
    ks = np.arange(1, E + 1)
    shares, means = {}, {}
    for split, mask in {"overall": np.ones(C, dtype=bool), **split_of_classes(class_counts)}.items():
        counts = hist[mask].sum(0)
        n = counts.sum()
        shares[split] = [float(v) for v in (counts / n if n else np.full(E, np.nan))]
        means[split] = float((counts * ks).sum() / n) if n else float("nan")
    return shares, means


def plot_expert_usage(report: RoutedReport, path: str | Path, title: str = "") -> Path:
    """Stacked bars: per split, the share of test images that used 1..E experts (paper, Fig. 6)."""
    plt = pyplot()
    splits = [s for s in ("many", "medium", "few", "overall") if s in report.usage]
    shares = np.asarray([report.usage[s] for s in splits]) * 100.0  # [splits, E]
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=120)
    bottom = np.zeros(len(splits))
    colors = plt.get_cmap("Blues")(np.linspace(0.35, 0.95, report.num_experts))
    for k in range(report.num_experts):
        vals = np.nan_to_num(shares[:, k])
        bars = ax.bar(splits, vals, bottom=bottom, color=colors[k], edgecolor="white", label=f"{k + 1} expert{'s' if k else ''}")
        for bar, v, b in zip(bars, vals, bottom):
            if v >= 6:
                ax.text(bar.get_x() + bar.get_width() / 2, b + v / 2, f"{v:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if k >= report.num_experts / 2 else "black")
        bottom += vals
    ax.set_ylim(0, 100)
    ax.set_ylabel("test images (%)")
    ax.set_title(title or f"Experts used per image (threshold {report.threshold:g})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return save_figure(fig, path)


def write_report(report: RoutedReport, json_path: str | Path, png_path: str | Path | None = None, extra: dict | None = None) -> dict:
    """The report as JSON (atomically) and, if asked, the usage PNG; returns the JSON dict."""
    data = report.as_dict()
    if png_path is not None:
        data["usage_plot"] = str(plot_expert_usage(report, png_path))
    if extra:
        data.update(extra)
    atomic_write_text(json.dumps(data, indent=2), json_path)
    return data


def report_paths(checkpoint: str | Path, json_path: str | Path | None = None) -> tuple[Path, Path]:
    """Where a routed report goes: --json if given, else <checkpoint stem>_eval.json; the PNG beside it."""
    json_path = Path(json_path) if json_path else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_eval.json")
    return json_path, json_path.with_name(f"{json_path.stem.removesuffix('_eval')}_usage.png")


# thresholds the sweep table always shows (the PNG and the JSON hold the whole curve)
SWEEP_TABLE = (1.0, 0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.001, 0.0)


def sweep_table(curve: ThresholdCurve, chosen: float) -> str:
    """The curve at the SWEEP_TABLE thresholds and the chosen one, as a text table."""
    rows = threshold_curve_rows(curve, [*SWEEP_TABLE, chosen])
    E = curve.usage.shape[1]
    all_macs = curve.mean_macs[-1]
    head = (f"{'threshold':>10}{'accuracy':>10}{'drop':>7}{'+-SE':>6}{'GMACs/img':>11}{'x all':>7}{'mean E':>8}  experts "
            + " / ".join(str(k) for k in range(1, E + 1)) + " %")
    lines = [head]
    for i, t in rows:
        usage = " / ".join(f"{100 * u:.0f}" for u in curve.usage[i])
        mark = "  <- chosen" if t == chosen else ""
        lines.append(f"{t:>10.4g}{curve.accuracy[i]:>10.2f}{curve.drop[i]:>7.2f}{curve.drop_se[i]:>6.2f}"
                     f"{curve.mean_macs[i] / 1e9:>11.4f}{curve.mean_macs[i] / all_macs:>7.3f}{curve.mean_experts[i]:>8.2f}  {usage}{mark}")
    return "\n".join(lines)


def threshold_curve_rows(curve: ThresholdCurve, thresholds) -> list[tuple[int, float]]:
    """(index into `curve`, threshold) for each of `thresholds`, highest first: the point whose
    decisions that threshold makes (curve.thresholds are descending, each standing for its interval)."""
    out = []
    for t in sorted({float(t) for t in thresholds}, reverse=True):
        i = int(np.flatnonzero(curve.thresholds <= t)[0]) if (curve.thresholds <= t).any() else len(curve.thresholds) - 1
        out.append((i, t))
    return out


def plot_sweep(curve: ThresholdCurve, chosen: float, path: str | Path, title: str = "") -> Path:
    """Accuracy against GMACs per image over every threshold (the paper's Figure 7 view), with the
    chosen threshold, all experts and expert 1 alone marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=120)
    g = curve.mean_macs / 1e9
    ax.plot(g, curve.accuracy, "-", color="tab:blue", linewidth=1.2, label="routed, every threshold")
    (i_chosen, _), = threshold_curve_rows(curve, [chosen])
    ax.plot(g[-1], curve.accuracy[-1], "s", color="black", markersize=7, label=f"all {curve.usage.shape[1]} experts")
    ax.plot(g[0], curve.accuracy[0], "o", color="grey", markersize=7, label="expert 1 alone")
    ax.plot(g[i_chosen], curve.accuracy[i_chosen], "*", color="tab:red", markersize=13,
            label=f"chosen: threshold {chosen:.3g} ({g[i_chosen] / g[-1]:.2f} x MACs)")
    ax.set_xlabel("GMACs per image (trunk + experts used + routers)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Routed accuracy against cost, every threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def evaluate_routed_checkpoint(checkpoint: str | Path, overrides: dict | None = None, json_path: str | Path | None = None, *,
                               log: Callable[[str], None] = print, datasets=None, sweep: bool = False) -> RoutedReport:
    """`ride-fast eval` on a routed checkpoint: the report, printed and written as JSON + PNG.
    The run's own config (defaults for a converted original checkpoint; its router.threshold is the
    one stage 2 chose), then `overrides` (e.g. {"router": {"threshold": 0.3}, "data": {"root": ...}}).
    `datasets` = (train, test) replaces building cfg.data. `sweep`: also the test set's accuracy and
    MACs at every threshold (one all-experts pass, replayed): printed as a table, written as
    <stem>_sweep.json and <stem>_sweep.png."""
    cfg = checkpoint_config(load_checkpoint(checkpoint), overrides)
    device = resolve_device(cfg.train.device)
    net, router, _ = load_routed_checkpoint(checkpoint, device, channels_last=cfg.model.channels_last)
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    if train_set.num_classes != net.num_classes:
        raise ValueError(f"the checkpoint's network has {net.num_classes} classes but data {cfg.data.name} has {train_set.num_classes}")
    test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)[1]
    report = evaluate_routed(net, router, test_loader, train_set.class_counts(),
                             image_size=cfg.data.image_size, threshold=cfg.router.threshold, amp=cfg.train.amp)
    json_path, png_path = report_paths(checkpoint, json_path)
    extra = {"checkpoint": str(checkpoint)}
    lines = [f"{checkpoint}:", report.summary()]
    written = [json_path, png_path]
    if sweep:
        test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)[1]
        curve = threshold_curve(score_routers(net, router, test_loader, cfg.train.amp), report.cost)
        sweep_json = json_path.with_name(f"{json_path.stem.removesuffix('_eval')}_sweep.json")
        sweep_png = plot_sweep(curve, report.threshold, sweep_json.with_suffix(".png"),
                               title=f"{Path(checkpoint).name}: accuracy against cost on the test set")
        idx = threshold_curve_rows(curve, [report.threshold])[0][0]
        atomic_write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": report.threshold, "chosen": curve.point(idx),
                                      "all_experts_accuracy": curve.all_experts_accuracy, "num_images": curve.num_images,
                                      "curve": curve.points()}, indent=2), sweep_json)
        extra["sweep"] = {"json": str(sweep_json), "png": str(sweep_png)}
        lines += [f"accuracy and cost on the {curve.num_images} test images at every threshold ({len(curve.thresholds)} points; "
                  f"drop = all experts - routed, +-SE its standard error):", sweep_table(curve, report.threshold)]
        written += [sweep_json, sweep_png]
    write_report(report, json_path, png_path, extra=extra)
    log("\n".join(lines) + "\nwrote " + ", ".join(str(p) for p in written))
    return report
