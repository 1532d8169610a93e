"""The accuracy-cost curve of routed inference (docs/method.md §5, §6).

One all-experts pass gives every router's probability for every image (`score_routers`); the
sequential decisions of routed inference are then replayed offline at every threshold that changes
one (`threshold_curve`), giving accuracy and MACs per image along the whole curve. Calibration
chooses its threshold on it (engine/calibration.py) and `ride-fast eval --sweep` prints and plots
it (`sweep_table`, `plot_sweep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ride_fast.engine.routed_cost import RoutedCost
from ride_fast.engine.runtime import autocast_context
from ride_fast.io import pyplot, save_figure
from ride_fast.models import RIDENet
from ride_fast.router import Router, prefix_mean_logits


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
        right.append(means.argmax(-1) == batch.labels)  # kept on the device: one copy to the host after the loop
        probs.append(torch.sigmoid(router.forward_all(out.features[:-1].float(), means[:-1]).float()))
        labels.append(batch.labels)
    if not labels:
        raise ValueError("score_routers: the loader yielded no images")
    return RouterScores(torch.cat(probs, 1).cpu().numpy(), torch.cat(right, 1).cpu().numpy(), torch.cat(labels).cpu().numpy(),
                        net.num_classes)


@dataclass
class ThresholdCurve:
    """Routed accuracy and cost at candidate thresholds (T, highest threshold first), replayed
    from one all-experts pass. Accuracies are percent: `accuracy` (and `all_experts_accuracy`, the
    drop and its SE) is the class-mean accuracy, the mean over the classes present of each class's
    accuracy, which calibration measures; `overall` (and `all_experts_overall`) is the accuracy over
    the images, as `ride-fast eval` reports "overall". They are equal on a set with as many images
    in every class.

    drop = all-experts accuracy - routed accuracy; drop_se is its standard error over the images:
    sqrt(sum_i w_i^2 |d_i|), d_i = (all experts right) - (routed right) on image i, w_i = 100 /
    (classes present x images of its class); with equal classes, 100 sqrt(b) / N, b = the images on
    which routed and all experts disagree in correctness (the paired, McNemar view).
    """

    thresholds: np.ndarray  # [T] descending
    accuracy: np.ndarray  # [T] class-mean accuracy
    drop: np.ndarray  # [T] of the class-mean accuracy
    drop_se: np.ndarray  # [T]
    mean_macs: np.ndarray  # [T] per image, routers included
    usage: np.ndarray  # [T, E] share of images that used exactly 1..E experts
    all_experts_accuracy: float  # class-mean
    num_images: int
    per_class: list[int]
    overall: np.ndarray  # [T] accuracy over the images
    all_experts_overall: float

    @property
    def mean_experts(self) -> np.ndarray:
        return self.usage @ np.arange(1, self.usage.shape[1] + 1)

    def point(self, i: int) -> dict:
        """Point i of the curve; "class_mean_accuracy" is `accuracy` (with "drop" and "drop_se" in
        it), "overall" the accuracy over the images."""
        return {"threshold": float(self.thresholds[i]), "class_mean_accuracy": float(self.accuracy[i]),
                "overall": float(self.overall[i]), "drop": float(self.drop[i]),
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
    d_right = right[k, i] - right[k - 1, i]  # +1: the move makes image i right, -1: wrong
    d_acc = w[i] * d_right
    d_overall = 100.0 / N * d_right
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
    start_overall = 100.0 * float(right[0].mean())
    overall = np.concatenate([[start_overall], start_overall + np.cumsum(d_overall[order])])
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
                          cost_t[done], usage[done], all_acc, int(N), counts.tolist(), overall[done],
                          100.0 * float(all_right.mean()))


# thresholds the sweep table always shows (the PNG and the JSON hold the whole curve)
SWEEP_TABLE = (1.0, 0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.001, 0.0)


def sweep_table(curve: ThresholdCurve, chosen: float) -> str:
    """The curve at the SWEEP_TABLE thresholds and the chosen one, as a text table: class-mean
    accuracy (the drop and its SE are of it), overall accuracy (over the images), cost, usage."""
    rows = threshold_curve_rows(curve, [*SWEEP_TABLE, chosen])
    E = curve.usage.shape[1]
    all_macs = curve.mean_macs[-1]
    head = (f"{'threshold':>10}{'class-mean':>11}{'overall':>9}{'drop':>7}{'+-SE':>6}{'GMACs/img':>11}{'x all':>7}{'mean E':>8}"
            "  experts " + " / ".join(str(k) for k in range(1, E + 1)) + " %")
    lines = [head]
    for i, t in rows:
        usage = " / ".join(f"{100 * u:.0f}" for u in curve.usage[i])
        mark = "  <- chosen" if t == chosen else ""
        lines.append(f"{t:>10.4g}{curve.accuracy[i]:>11.2f}{curve.overall[i]:>9.2f}{curve.drop[i]:>7.2f}{curve.drop_se[i]:>6.2f}"
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
    ax.set_ylabel("class-mean test accuracy (%)")
    ax.set_title(title or "Routed accuracy against cost, every threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
