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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ride_fast.data import SPLITS, build_datasets, build_loaders, split_of_classes
from ride_fast.engine.checkpoint import atomic_write_text, check_data_classes, load_checkpoint, load_routed_checkpoint
from ride_fast.engine.evaluate import describe_scored, eval_config, scored_data, split_counts
from ride_fast.engine.metrics import SplitAccuracy, count_into, pct, per_class_accuracy, split_accuracy
from ride_fast.engine.monitor import info, progress
from ride_fast.engine.routed_cost import RoutedCost, RoutedTiming, baseline_macs, routed_cost, time_routed
from ride_fast.engine.runtime import autocast_context, resolve_device
from ride_fast.engine.threshold_curve import plot_sweep, score_routers, sweep_table, threshold_curve, threshold_curve_rows
from ride_fast.io import json_text, plural, pyplot, save_figure
from ride_fast.models import RIDENet
from ride_fast.router import Router, gather_rows, routed_forward


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
            f"{'all experts':<13}{a.overall:>9.2f}{pct(a.many, '>8.2f')}{pct(a.medium, '>8.2f')}{pct(a.few, '>8.2f')}"
            f"{self.all_experts_macs / 1e9:>11.4f}{self.ms_per_image['all_experts']:>9.3f}",
            f"{'routed':<13}{r.overall:>9.2f}{pct(r.many, '>8.2f')}{pct(r.medium, '>8.2f')}{pct(r.few, '>8.2f')}"
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
    show_progress: bool = True,
) -> RoutedReport:
    """Accuracy, expert usage, MACs and time per image of routed vs all-experts inference.

    `loader` yields Batch(images, labels) on the network's device (e.g. an evaluation
    InMemoryLoader); `class_counts` are the training counts that define the splits. `cost` and
    `baseline` (MACs) may be passed when already counted (fvcore tracing takes a while). After the
    accuracy pass, `timing` measures time on `timing_images` test images spread over the set, at the
    loader's batch (`time_routed`: `repeats` A B B A rounds, batch-1 latency on `latency_images` images).
    `show_progress`: a progress bar over the batches (on a terminal; see engine/monitor.py).
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
    for batch in progress(loader, "routed eval", enabled=show_progress):
        x, y = batch.images, batch.labels
        batch_size = max(batch_size, x.shape[0])
        if kept_n < timing_images and per_batch:  # the timing phase reuses test images spread over the whole set
            take = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0], timing_images - kept_n), device=x.device).round().long()
            kept.append(gather_rows(x, take.unique()))  # keeps the layout (channels-last) that the timing runs on
            kept_n += kept[-1].shape[0]
        with autocast_context(device, amp):
            logits_all = net(x).logits
            out = routed_forward(net, router, x, threshold=threshold)
        c, t = per_class_accuracy(logits_all.argmax(1), y, C)
        correct_all += c
        total += t
        correct_routed += per_class_accuracy(out.logits.argmax(1), y, C)[0]
        count_into(usage, y * E + out.num_experts - 1)
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
        bars = ax.bar(splits, vals, bottom=bottom, color=colors[k], edgecolor="white", label=plural(k + 1, "expert"))
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
    atomic_write_text(json_text(data, indent=2), json_path)
    return data


def report_paths(checkpoint: str | Path, json_path: str | Path | None = None, name: str = "eval") -> tuple[Path, Path]:
    """Where a routed report goes: --json if given, else <checkpoint stem>_<name>.json (`ride-fast route`:
    <stem>_eval.json; `ride-fast eval`: <stem>_test_eval.json, so that it never replaces route's report
    and its stage-2 record); the PNG beside it (<stem>_usage.png, <stem>_test_usage.png)."""
    json_path = Path(json_path) if json_path else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_{name}.json")
    return json_path, json_path.with_name(f"{json_path.stem.removesuffix('_eval')}_usage.png")


def evaluate_routed_checkpoint(checkpoint: str | Path, overrides: dict | None = None, json_path: str | Path | None = None, *,
                               log: Callable[[str], None] = info, datasets=None, sweep: bool = False) -> RoutedReport:
    """`ride-fast eval` on a routed checkpoint: the report, printed and written as JSON + PNG
    (<stem>_test_eval.json and <stem>_test_usage.png by default: route's <stem>_eval.json stays as it is).
    The run's own config (its router.threshold is the one stage 2 chose; a checkpoint without a data
    config needs data options), then `overrides` (e.g. {"router": {"threshold": 0.3}, "data": {"root": ...}}).
    `datasets` = (train, test) replaces building cfg.data. `sweep`: also the test set's accuracy and
    MACs at every threshold (one all-experts pass, replayed): printed as a table, written as
    <stem>_test_sweep.json and <stem>_test_sweep.png (beside --json: <name>_sweep.json)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = eval_config(ckpt, checkpoint, overrides, routed=True, datasets=datasets, log=log)
    device = resolve_device(cfg.train.device)
    net, router, _ = load_routed_checkpoint(checkpoint, device, channels_last=cfg.model.channels_last)
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    check_data_classes(checkpoint, net.num_classes, cfg.data.name, train_set.num_classes)
    test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)[1]
    report = evaluate_routed(net, router, test_loader, split_counts(ckpt, train_set, checkpoint, log),
                             image_size=cfg.data.image_size, threshold=cfg.router.threshold, amp=cfg.train.amp)
    json_path, png_path = report_paths(checkpoint, json_path, "test_eval")
    extra = scored_data(cfg, test_set, checkpoint)
    log("\n".join([f"{describe_scored(extra)}:", report.summary()]))  # the numbers first: a failed write loses none of them
    written = [json_path, png_path]
    if sweep:
        test_loader = build_loaders(cfg.data, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed)[1]
        curve = threshold_curve(score_routers(net, router, test_loader, cfg.train.amp), report.cost)
        log(f"accuracy and cost on the {curve.num_images} test images at every threshold ({len(curve.thresholds)} points; "
            "class-mean: the mean of the per-class accuracies, with drop = all experts - routed and +-SE its standard error; "
            "overall: over the images, as the report's overall):\n" + sweep_table(curve, report.threshold))
        sweep_json = json_path.with_name(f"{json_path.stem.removesuffix('_eval')}_sweep.json")
        sweep_png = plot_sweep(curve, report.threshold, sweep_json.with_suffix(".png"),
                               title=f"{Path(checkpoint).name}: accuracy against cost on the test set")
        idx = threshold_curve_rows(curve, [report.threshold])[0][0]
        atomic_write_text(json_text({"checkpoint": str(checkpoint), "threshold": report.threshold, "chosen": curve.point(idx),
                                      "all_experts_class_mean_accuracy": curve.all_experts_accuracy,
                                      "all_experts_overall": curve.all_experts_overall, "num_images": curve.num_images,
                                      "curve": curve.points()}, indent=2), sweep_json)
        extra["sweep"] = {"json": str(sweep_json), "png": str(sweep_png)}
        written += [sweep_json, sweep_png]
    write_report(report, json_path, png_path, extra=extra)
    log("wrote " + ", ".join(str(p) for p in written))
    return report
