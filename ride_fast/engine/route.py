"""Stage 2: train the routers of a frozen stage-1 network, then measure what routing buys.

Shape legend: B images, E experts, R = E - 1 routers, C classes, D pooled feature width.

Training (docs/method.md §5). Every stage-1 parameter is frozen and BatchNorm stays in eval mode, so
per batch the frozen network runs once, without autograd (and under bf16 autocast with
train.amp=bf16), with all experts: expert_logits [E, B, C] and features [E, B, D] give the router
labels and the inputs of all R routers at once; only the routers get gradients. Batches come from
the class-balanced sampler (epoch = N draws) with the stage-1 training augmentation; SGD with
Nesterov momentum, cosine lr to 0 stepped per epoch. The checkpoint holds the whole routed model.

Options beyond the spec (`Stage2Options`; the defaults are the spec's stage 2). A stage-1 network
that memorises a small training set makes the spec's labels ("the prefix ensemble is wrong and a
longer prefix is right") almost never positive on it: on the 988-image MNIST-LT of the demo,
experts 1-2 are right on 99.97 % of augmented, class-balanced training draws, so router 2 never sees
a positive label and expert 3 is never called. `router_data="heldout"` trains the routers on images
of the full data set that the long-tailed training set left out (`heldout_split`: found by
content, disjoint from the test set); `threshold="auto"` picks the cheapest threshold whose routed
accuracy on other held-out images stays within `max_accuracy_drop` points of all experts
(`calibrate_threshold`, one all-experts pass scores every threshold). `fit_stage2` runs either;
the checkpoint's config carries the threshold chosen and its `stage2` entry the options, held-out
counts and calibration curve.

Evaluation (§6). One pass over the test set runs, per batch, all experts and the routed model
(timed separately, interleaved so load drift hits both alike), and reports accuracy for both,
the share of images that used exactly 1..E experts (overall and per many/medium/few split),
MACs per routed image (trunk + used experts + evaluated routers, counted with fvcore part by
part) against the single-expert baseline of the same backbone, and milliseconds per image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ride_fast.config import Config, ModelConfig, RouterConfig, config_from_dict, config_to_dict, dump_config, update
from ride_fast.data import SPLITS, ArrayDataset, InMemoryLoader, build_datasets, build_loaders, split_of_classes
from ride_fast.engine.checkpoint import CheckpointError, atomic_save, atomic_write_text, load_checkpoint
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.runtime import autocast_context, resolve_device, seed_everything
from ride_fast.io import pyplot, save_figure
from ride_fast.models import RIDENet, create_model
from ride_fast.profiling import ModelCost, count_macs, model_cost
from ride_fast.router import Router, prefix_mean_logits, routed_forward, router_step

ROUTED_KIND = "ride_fast.routed"


# ---------------------------------------------------------------------------------------------
# building blocks


def build_router(cfg: RouterConfig, net: RIDENet) -> Router:
    """A Router sized for `net` from the router section of the config."""
    return Router(net.num_experts, net.feature_dim, net.num_classes, top_k=cfg.top_k, hidden=cfg.hidden, share_fc=cfg.share_fc)


def router_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Cosine annealing to 0 over `epochs`, stepped per epoch (epoch counted from 1):
    base_lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, as CosineAnnealingLR(T_max=epochs)."""
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def freeze(net: nn.Module) -> nn.Module:
    """Stage-1 network for stage 2: no parameter trains, BatchNorm in eval mode."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class RouterEpochResult:
    """One stage-2 epoch. Shares are fractions of the images seen, one entry per router."""

    epoch: int
    lr: float
    loss: float
    label_share: list[float]  # images whose label says "call the next expert"
    call_share: list[float]  # images the router sends on (sigmoid(r) > threshold)
    router_accuracy: list[float]  # decision == label
    seconds: float
    images_per_s: float


def balanced_loaders(cfg: Config, train_set, test_set, device: torch.device):
    """(stage-2 training loader, test loader): the class-balanced sampler (an epoch is N draws),
    the stage-1 training augmentation, batches of router.batch_size."""
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.router.batch_size)
    return build_loaders(data_cfg, train_set, test_set, device, channels_last=cfg.model.channels_last, seed=cfg.train.seed,
                         train_sampler="balanced")


class RouterTrainer:
    """Trains the routers of a (frozen) RIDENet: `fit()`, then `save(path)`.

    `loader` defaults to the class-balanced loader of `train_set` (see `balanced_loaders`).
    `class_counts` are the stage-1 training counts (they define the many/medium/few splits);
    they default to `train_set`'s, and must be given when the routers train on other images
    (held-out data, see `Stage2Options`).
    """

    def __init__(
        self,
        cfg: Config,
        net: RIDENet,
        train_set,
        *,
        loader=None,
        router: Router | None = None,
        log: Callable[[str], None] = print,
        stage1_checkpoint: str = "",
        class_counts=None,
    ) -> None:
        if net.num_experts < 2:
            raise ValueError(f"stage 2 needs a network with at least 2 experts; {net.name} has {net.num_experts}")
        if train_set.num_classes != net.num_classes:
            raise ValueError(f"the network has {net.num_classes} classes but the data set {train_set.name} has {train_set.num_classes}")
        self.cfg = cfg
        self.log = log
        self.net = freeze(net)
        self.device = next(net.parameters()).device
        self.class_counts = np.asarray(train_set.class_counts() if class_counts is None else class_counts)
        self.stage1_checkpoint = str(stage1_checkpoint)
        self.stage2_info: dict = {}  # what fit_stage2 adds to the checkpoint: options, held-out counts, calibration
        rc = cfg.router
        self.router = (router if router is not None else build_router(rc, net)).to(self.device)
        self.optimizer = torch.optim.SGD(self.router.parameters(), lr=rc.lr, momentum=rc.momentum, nesterov=True, weight_decay=rc.weight_decay)
        self.loader = loader if loader is not None else balanced_loaders(cfg, train_set, train_set, self.device)[0]
        self.history: list[RouterEpochResult] = []

    def train_epoch(self, epoch: int) -> RouterEpochResult:
        rc, amp = self.cfg.router, self.cfg.train.amp
        lr = router_lr(epoch, rc.lr, rc.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loader.set_epoch(epoch)
        self.net.eval()
        self.router.train()
        R = self.router.num_routers
        loss_sum = torch.zeros((), device=self.device)
        label_pos = torch.zeros(R, device=self.device)
        call_pos = torch.zeros(R, device=self.device)
        agree = torch.zeros(R, device=self.device)
        seen = 0
        steps = len(self.loader)
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        start = time.perf_counter()
        for step, batch in enumerate(self.loader):
            if step >= steps:
                break
            with torch.no_grad(), autocast_context(self.device, amp):
                out = self.net(batch.images)  # all experts, once: labels and router inputs
            result = router_step(self.router, out.expert_logits, out.features, batch.labels, rc.w_on)
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                n = batch.labels.shape[0]
                calls = torch.sigmoid(result.router_logits) > rc.threshold
                loss_sum += result.loss.detach() * n
                label_pos += result.labels.sum(1)
                call_pos += calls.sum(1)
                agree += (calls == result.labels).sum(1)
            seen += n
        _sync(self.device)
        seconds = time.perf_counter() - start
        mean_loss = float(loss_sum) / max(seen, 1)  # the epoch's host reads
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"router epoch {epoch}: the loss is {mean_loss}; lower router.lr")
        share = lambda t: [float(v) / max(seen, 1) for v in t.cpu()]  # noqa: E731
        return RouterEpochResult(epoch, lr, mean_loss, share(label_pos), share(call_pos), share(agree), seconds, seen / max(seconds, 1e-9))

    def fit(self) -> list[RouterEpochResult]:
        for epoch in range(len(self.history) + 1, self.cfg.router.epochs + 1):
            r = self.train_epoch(epoch)
            self.history.append(r)
            pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
            self.log(
                f"router epoch {epoch}/{self.cfg.router.epochs}  lr {r.lr:.4f}  loss {r.loss:.4f}  "
                f"label+ {pct(r.label_share)}%  called {pct(r.call_share)}%  agree {pct(r.router_accuracy)}%  "
                f"{r.images_per_s:,.0f} img/s"
            )
        return self.history

    def checkpoint(self) -> dict:
        return routed_checkpoint(self.net, self.router, self.cfg, self.class_counts, self.history, self.stage1_checkpoint,
                                 self.stage2_info)

    def save(self, path: str | Path) -> Path:
        """Write the routed model atomically, and its resolved config beside it."""
        path = Path(path)
        out = atomic_save(self.checkpoint(), path)
        atomic_write_text(dump_config(self.cfg), path.with_name(f"{path.stem}_config.yaml"))
        return out


# ---------------------------------------------------------------------------------------------
# checkpoints


def routed_checkpoint(net: RIDENet, router: Router, cfg: Config, class_counts, history=(), stage1_checkpoint: str = "",
                      stage2: dict | None = None) -> dict:
    """The whole routed model as plain data (readable with weights_only=True):
    model + model_args (stage-1 network), router_state + router_args, config (its
    router.threshold is the one to route with, calibrated or not), class_counts, stage2 (the
    data options, held-out counts and threshold calibration, when not the spec's).
    The network is stored in the per-expert layout, like the trainer's checkpoints."""
    if getattr(net, "batched", False):
        from ride_fast.models.batched import to_per_expert

        net = to_per_expert(net)
    return {
        "kind": ROUTED_KIND,
        "model": net.state_dict(),
        "model_args": dict(net.model_args),
        "router_state": router.state_dict(),
        "router_args": router.router_args,
        "config": config_to_dict(cfg),
        "class_counts": [int(c) for c in class_counts],
        "router_history": [asdict(h) for h in history],
        "stage1_checkpoint": str(stage1_checkpoint),
        "stage2": dict(stage2 or {}),
    }


def is_routed_checkpoint(ckpt: dict) -> bool:
    """A ride_fast routed checkpoint, or a converted original one that carries router weights."""
    return "router_state" in ckpt or bool(ckpt.get("router"))


def router_from_checkpoint(ckpt: dict, num_classes: int) -> Router:
    """The router of a routed checkpoint (ride_fast's own or the original's converted weights)."""
    if "router_state" in ckpt:
        if "router_args" not in ckpt:
            raise CheckpointError("the checkpoint has router_state but no router_args to rebuild the router")
        router = Router(**ckpt["router_args"])
        router.load_state_dict(ckpt["router_state"])
        return router
    if ckpt.get("router"):
        return Router.from_original(ckpt["router"], num_classes)
    raise CheckpointError("the checkpoint holds no router (neither router_state nor converted original router weights)")


def load_routed_checkpoint(path: str | Path, device: str | torch.device = "cpu", channels_last: bool = False) -> tuple[RIDENet, Router, dict]:
    """(network, router, checkpoint dict) from a routed checkpoint, both modules in eval mode."""
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{path}: no 'model_args' entry; was it written by `ride-fast route` or `ride-fast convert`?")
    net = create_model(**ckpt["model_args"])
    net.load_state_dict(ckpt["model"])
    try:
        router = router_from_checkpoint(ckpt, net.num_classes)
    except (CheckpointError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return net.to(device, memory_format=fmt).eval(), router.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------
# cost


class _RouterStep(nn.Module):
    def __init__(self, router: Router, step: int) -> None:
        super().__init__()
        self.router, self.step = router, step

    def forward(self, feature: Tensor, mean_logits: Tensor) -> Tensor:
        return self.router(self.step, feature, mean_logits)


@dataclass(frozen=True)
class RoutedCost:
    """MACs per image of a routed RIDE network, by part (fvcore, batch 1)."""

    network: ModelCost
    router_macs: int  # one router (all routers are the same size)
    router_params: int  # one router: its hidden layer + the shared final layer
    routers_params: int  # all routers together

    @property
    def num_experts(self) -> int:
        return len(self.network.expert_macs)

    def macs_with(self, n: int, routers: bool = True) -> int:
        """An image that used n experts: trunk + experts 1..n (+ the min(n, E - 1) routers it went through)."""
        return self.network.macs_with(n) + (min(n, self.num_experts - 1) * self.router_macs if routers else 0)

    def as_dict(self) -> dict:
        E = self.num_experts
        return {
            **self.network.as_dict(),
            "router_macs": self.router_macs,
            "router_params": self.router_params,
            "routers_params": self.routers_params,
            "macs_with_k_experts_and_routers": [self.macs_with(k) for k in range(1, E + 1)],
        }


@torch.no_grad()
def count_router_macs(router: Router) -> int:
    """MACs of one router on one image (fvcore; every router has the same size)."""
    device = next(router.parameters()).device
    was_training = router.training
    router.eval()
    try:
        feature = torch.ones(1, router.feature_dim, device=device)
        mean_logits = torch.zeros(1, router.num_classes, device=device)
        return count_macs(_RouterStep(router, 0), feature, mean_logits)
    finally:
        router.train(was_training)


def router_params(router: Router) -> tuple[int, int]:
    """(parameters of one router: its hidden layer + the final layer, parameters of all routers)."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    final = n(router.fc) if router.share_fc else n(router.fcs[0])
    return n(router.hidden[0]) + final, n(router)


def routed_cost(net: RIDENet, router: Router, image_size: int, in_channels: int = 3) -> RoutedCost:
    """Count trunk, each expert (branch + classifier) and one router separately with fvcore:
    a single trace of the routed model would only count the branch it happened to take."""
    one, every = router_params(router)
    return RoutedCost(model_cost(net, image_size, in_channels), count_router_macs(router), one, every)


def baseline_macs(model_args: dict, image_size: int, in_channels: int = 3) -> int:
    """MACs per image of the single-expert baseline of the same backbone: 1 expert,
    reduce_dimension=False, Linear head (ResNet-32: 0.0701 G; ResNet-50: 4.134 G)."""
    base = create_model(model_args["name"], num_classes=model_args["num_classes"], num_experts=1, reduce_dimension=False, use_norm=False)
    return model_cost(base, image_size, in_channels).total_macs


# ---------------------------------------------------------------------------------------------
# evaluation


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
    ms_per_image: dict[str, float]  # "routed", "all_experts"
    cost: RoutedCost  # MACs and parameters by part
    device: str = ""

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
                "all_experts_ratio_to_baseline": self.all_experts_macs / self.baseline_macs,
                "parts": self.cost.as_dict(),
            },
            "ms_per_image": self.ms_per_image,
            "device": self.device,
        }

    def summary(self) -> str:
        a, r = self.all_experts, self.routed
        usage = "  ".join(f"{k + 1}: {100 * s:.1f}%" for k, s in enumerate(self.usage["overall"]))
        per_split = "  ".join(f"{s} {self.mean_experts[s]:.2f}" for s in SPLITS)
        return "\n".join([
            f"{'':<13}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}{'GMACs/img':>11}{'ms/img':>9}",
            f"{'all experts':<13}{a.overall:>9.2f}{a.many:>8.2f}{a.medium:>8.2f}{a.few:>8.2f}"
            f"{self.all_experts_macs / 1e9:>11.4f}{self.ms_per_image['all_experts']:>9.3f}",
            f"{'routed':<13}{r.overall:>9.2f}{r.many:>8.2f}{r.medium:>8.2f}{r.few:>8.2f}"
            f"{self.mean_macs / 1e9:>11.4f}{self.ms_per_image['routed']:>9.3f}",
            f"threshold {self.threshold:g}; experts used: {usage}; mean experts per image: {per_split}, "
            f"overall {self.mean_experts['overall']:.2f}",
            f"routed MACs/img = {self.macs_ratio_to_baseline:.3f} x the single-expert baseline ({self.baseline_macs / 1e9:.4f} G); "
            f"all experts = {self.all_experts_macs / self.baseline_macs:.3f} x",
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
) -> RoutedReport:
    """Accuracy, expert usage, MACs and time per image of routed vs all-experts inference.

    `loader` yields Batch(images, labels) on the network's device (e.g. an evaluation
    InMemoryLoader); `class_counts` are the training counts that define the splits. `cost` and
    `baseline` (MACs) may be passed when already counted (fvcore tracing takes a while).
    """
    device = next(net.parameters()).device
    net.eval()
    router.eval()
    C, E = net.num_classes, net.num_experts
    correct_all = torch.zeros(C, dtype=torch.long, device=device)
    correct_routed = torch.zeros_like(correct_all)
    total = torch.zeros_like(correct_all)
    usage = torch.zeros(C * E, dtype=torch.long, device=device)  # [class, experts used - 1]
    seconds = {"all_experts": 0.0, "routed": 0.0}
    warm = False
    for batch in loader:
        x, y = batch.images, batch.labels
        with autocast_context(device, amp):
            if not warm:  # first-call dispatch and allocator warm-up, untimed
                net(x[:2])
                routed_forward(net, router, x[:2], threshold=threshold)
                warm = True
            _sync(device)
            t0 = time.perf_counter()
            logits_all = net(x).logits
            _sync(device)
            t1 = time.perf_counter()
            out = routed_forward(net, router, x, threshold=threshold)
            _sync(device)
            t2 = time.perf_counter()
        seconds["all_experts"] += t1 - t0
        seconds["routed"] += t2 - t1
        c, t = per_class_accuracy(logits_all.argmax(1), y, C)
        correct_all += c
        total += t
        correct_routed += per_class_accuracy(out.logits.argmax(1), y, C)[0]
        usage += torch.bincount(y * E + out.num_experts - 1, minlength=C * E)
    hist = usage.view(C, E).cpu().numpy().astype(np.float64)
    n_images = int(hist.sum())
    if n_images == 0:
        raise ValueError("evaluate_routed: the loader yielded no images")
    masks = {"overall": np.ones(C, dtype=bool), **split_of_classes(class_counts)}
    shares, means = {}, {}
    ks = np.arange(1, E + 1)
    for split, mask in masks.items():
        counts = hist[mask].sum(0)
        n = counts.sum()
        shares[split] = [float(v) for v in (counts / n if n else np.full(E, np.nan))]
        means[split] = float((counts * ks).sum() / n) if n else float("nan")
    cost = cost or routed_cost(net, router, image_size, in_channels)
    overall = np.asarray(shares["overall"])
    mean_macs = float(sum(overall[k - 1] * cost.macs_with(k) for k in ks))
    mean_macs_net = float(sum(overall[k - 1] * cost.macs_with(k, routers=False) for k in ks))
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
        ms_per_image={k: 1000.0 * v / n_images for k, v in seconds.items()},
        cost=cost,
        device=str(device) + ("" if device.type != "cpu" else f" ({torch.get_num_threads()} threads)"),
    )


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


# ---------------------------------------------------------------------------------------------
# held-out data for stage 2 and threshold calibration (options; the spec's stage 2 is the default)


HELDOUT_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")  # data sets with a full training set to draw unused images from


@dataclass(frozen=True)
class Stage2Options:
    """Where stage 2 takes its labels and its threshold from. The defaults are the spec's (§5):
    routers trained on the training set, threshold = router.threshold.

    router_data: "train" (the spec) or "heldout": train the routers on images of the full data set
        that the long-tailed training set left out (never seen in stage 1), `heldout_per_class` of
        each class at most (fewer where fewer are unused: none for the head class of MNIST-LT and
        CIFAR-LT, which keep all their images). Why: a stage-1 network that memorises its training
        set makes the spec's labels ("the prefix ensemble is wrong and a longer prefix is right")
        almost never positive there, so the routers never learn to call the last experts.
    threshold: "config" (router.threshold) or "auto": the cheapest threshold of `THRESHOLD_GRID` whose
        routed accuracy (mean per class) on a calibration split stays within `max_accuracy_drop`
        points of all experts on that split. The calibration split takes `calibration_per_class`
        unused images of each class, disjoint from the held-out router images.
    """

    router_data: Literal["train", "heldout"] = "train"
    heldout_per_class: int = 100
    threshold: Literal["config", "auto"] = "config"
    max_accuracy_drop: float = 1.0  # points
    calibration_per_class: int = 50

    def __post_init__(self) -> None:
        if self.router_data not in ("train", "heldout"):
            raise ValueError(f"stage-2 router_data must be 'train' (the spec) or 'heldout', got {self.router_data!r}")
        if self.threshold not in ("config", "auto"):
            raise ValueError(f"stage-2 threshold must be 'config' (router.threshold) or 'auto' (calibrated), got {self.threshold!r}")
        if self.heldout_per_class < 1 or self.calibration_per_class < 1:
            raise ValueError(f"held-out images per class must be >= 1, got heldout_per_class={self.heldout_per_class}, "
                             f"calibration_per_class={self.calibration_per_class}")
        if not self.max_accuracy_drop >= 0:
            raise ValueError(f"max_accuracy_drop is in points and must be >= 0, got {self.max_accuracy_drop}")

    @property
    def uses_heldout(self) -> bool:
        return self.router_data == "heldout" or self.threshold == "auto"

    @classmethod
    def from_router_config(cls, rc: RouterConfig) -> "Stage2Options":
        """The options the router config section sets: fields of the same names, and
        `router.calibrate: true` for threshold="auto"."""
        kw = {f.name: getattr(rc, f.name) for f in dataclasses.fields(cls) if f.name != "threshold"}
        return cls(**kw, threshold="auto" if rc.calibrate else "config")


def _image_keys(images: Tensor) -> list[bytes]:
    """A content digest per image (uint8 [N, K, H, W]): finds the same image in two data sets."""
    flat = np.ascontiguousarray(images.numpy()).reshape(images.shape[0], -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _subset(ds: ArrayDataset, idx: np.ndarray, name: str) -> ArrayDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


@dataclass
class HeldOut:
    """Unused images of the full data set: `router` trains the routers, `calibration` sets the
    threshold (disjoint; either may be None when not asked for)."""

    router: ArrayDataset | None
    calibration: ArrayDataset | None
    unused_per_class: list[int]

    def as_dict(self) -> dict:
        count = lambda ds: ds.class_counts().tolist() if ds is not None else []  # noqa: E731
        return {"unused_per_class": self.unused_per_class, "router_per_class": count(self.router),
                "calibration_per_class": count(self.calibration)}


def heldout_split(cfg: Config, train_set, test_set=None, options: Stage2Options | None = None, *, pool=None) -> HeldOut:
    """Images of the full training data (data.imbalance_factor = 1) that neither the long-tailed
    training set nor the test set holds, found by content. Per class, a seeded shuffle
    (train.seed) gives the first options.heldout_per_class to the routers (router_data=heldout) and
    the next options.calibration_per_class to the calibration (threshold=auto). `pool` = the full
    training data replaces building it."""
    options = options or Stage2Options()
    if pool is None:
        if cfg.data.name not in HELDOUT_DATASETS:
            raise ValueError(f"held-out stage-2 data needs the full training data of {', '.join(HELDOUT_DATASETS)}; "
                             f"data.name={cfg.data.name} has none: use the spec's stage 2 (router_data=train, threshold=config)")
        pool = build_datasets(dataclasses.replace(cfg.data, imbalance_factor=1.0))[0]
    if not isinstance(train_set, ArrayDataset) or not isinstance(pool, ArrayDataset):
        raise TypeError("held-out stage-2 data needs in-memory data sets (ArrayDataset)")
    seen = set(_image_keys(train_set.images))
    if test_set is not None:
        seen.update(_image_keys(test_set.images))
    unused = np.asarray([i for i, k in enumerate(_image_keys(pool.images)) if k not in seen], dtype=np.int64)
    labels = pool.labels.numpy()
    rng = np.random.default_rng(cfg.train.seed)
    n_router = options.heldout_per_class if options.router_data == "heldout" else 0
    n_calib = options.calibration_per_class if options.threshold == "auto" else 0
    router_idx, calib_idx = [], []
    for c in range(pool.num_classes):
        idx = rng.permutation(unused[labels[unused] == c])
        router_idx.append(np.sort(idx[:n_router]))
        calib_idx.append(np.sort(idx[n_router : n_router + n_calib]))
    router_idx, calib_idx = np.concatenate(router_idx), np.concatenate(calib_idx)
    if n_router and not len(router_idx) or n_calib and not len(calib_idx):
        raise ValueError(f"{cfg.data.name}: no image of the full training data is left out of the long-tailed set "
                         f"(imbalance_factor {cfg.data.imbalance_factor}); held-out stage-2 data needs some")
    return HeldOut(_subset(pool, router_idx, f"{pool.name}/heldout_router") if n_router else None,
                   _subset(pool, calib_idx, f"{pool.name}/heldout_calibration") if n_calib else None,
                   np.bincount(labels[unused], minlength=pool.num_classes).tolist())


# Weighted BCE (w_on = 100) calibrates sigmoid(r) to 100x the odds of 'call': 0.99 is about an unweighted 0.5.
THRESHOLD_GRID = (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)


@dataclass
class ThresholdCalibration:
    """The threshold chosen on a calibration split, and the curve it was chosen from (percent
    accuracies, mean per class over the classes present)."""

    threshold: float
    max_accuracy_drop: float
    all_experts_accuracy: float
    routed_accuracy: float
    mean_macs: float
    num_images: int
    per_class: list[int]
    curve: list[dict]  # threshold, accuracy, mean_experts, mean_macs

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"threshold {self.threshold:g} calibrated on {self.num_images} held-out images: routed {self.routed_accuracy:.2f} % "
                f"vs all experts {self.all_experts_accuracy:.2f} % (allowed drop {self.max_accuracy_drop:g} points), "
                f"{self.mean_macs / 1e6:.1f} MMACs per image")


@torch.no_grad()
def calibrate_threshold(net: RIDENet, router: Router, loader, cost: RoutedCost, *, max_accuracy_drop: float = 1.0,
                        grid=THRESHOLD_GRID, amp: str = "none") -> ThresholdCalibration:
    """The cheapest threshold of `grid` (lowest mean MACs per image, the higher threshold on ties)
    whose routed accuracy on `loader` is at most `max_accuracy_drop` points below all experts.

    One all-experts pass gives every router's probability on every image: routing only decides
    how many of the (deterministic) experts an image uses, so every threshold is scored from the
    same pass. Accuracy is the mean over classes present, as on a balanced test set.
    """
    device = next(net.parameters()).device
    net.eval()
    router.eval()
    C, E = net.num_classes, net.num_experts
    grid = sorted({float(t) for t in grid}, reverse=True)
    if not grid or not all(0.0 <= t <= 1.0 for t in grid):
        raise ValueError(f"calibration thresholds must lie in [0, 1], got {grid}")
    T = len(grid)
    th = torch.tensor(grid, device=device).view(T, 1, 1)
    correct = torch.zeros(T + 1, C, dtype=torch.long, device=device)  # row T: all experts
    total = torch.zeros(C, dtype=torch.long, device=device)
    used = torch.zeros(T, E, dtype=torch.long, device=device)  # [threshold, experts used - 1]
    for batch in loader:
        y = batch.labels
        with autocast_context(device, amp):
            out = net(batch.images)
        means = prefix_mean_logits(out.expert_logits)  # [E, B, C] float32
        right = means.argmax(-1) == y  # [E, B]
        p = torch.sigmoid(router.forward_all(out.features[:-1].float(), means[:-1]).float())  # [R, B]
        go = (p.unsqueeze(0) > th).long().cumprod(1)  # [T, R, B]: still going after router i
        n = 1 + go.sum(1)  # [T, B] experts used
        hit = right.gather(0, n - 1)  # [T, B]: the prediction of the experts used is right
        correct[:T] += torch.stack([torch.bincount(y[h], minlength=C) for h in hit])
        correct[T] += torch.bincount(y[right[-1]], minlength=C)
        total += torch.bincount(y, minlength=C)
        used += torch.stack([torch.bincount(k - 1, minlength=E) for k in n])
    present = total > 0
    if not present.any():
        raise ValueError("calibrate_threshold: the loader yielded no images")
    acc = (100.0 * correct[:, present].double() / total[present].double()).mean(1).tolist()  # [T + 1]
    shares = (used.double() / used.sum(1, keepdim=True)).cpu().numpy()
    macs = [float(sum(s[k] * cost.macs_with(k + 1) for k in range(E))) for s in shares]
    curve = [{"threshold": t, "accuracy": acc[i], "mean_experts": float((shares[i] * np.arange(1, E + 1)).sum()), "mean_macs": macs[i]}
             for i, t in enumerate(grid)]
    ok = [i for i in range(T) if acc[i] >= acc[T] - max_accuracy_drop - 1e-9]
    best = min(ok, key=lambda i: (macs[i], -grid[i])) if ok else T - 1  # none within the drop: the lowest threshold
    return ThresholdCalibration(grid[best], float(max_accuracy_drop), acc[T], acc[best], macs[best], int(total.sum()),
                                total.tolist(), curve)


@dataclass
class Stage2Result:
    """A trained router and the threshold to route with."""

    trainer: RouterTrainer
    threshold: float
    options: Stage2Options
    heldout: HeldOut | None
    calibration: ThresholdCalibration | None
    cost: RoutedCost | None  # counted (fvcore) only when the calibration needed it
    seconds: float  # router training and calibration


def fit_stage2(cfg: Config, net: RIDENet, train_set, test_set=None, *, options: Stage2Options | None = None, loader=None,
               log: Callable[[str], None] = print, stage1_checkpoint: str = "", pool=None) -> Stage2Result:
    """Train the routers of `net` (frozen) and settle the threshold, following `options` (default:
    the ones the router config section sets, else the spec's: training set, router.threshold).

    `loader` replaces the class-balanced loader of the training set (router_data=train only);
    `test_set` keeps test images out of the held-out data; `pool` = the full training data.
    The trainer's config carries the threshold chosen (router.threshold), its checkpoint the
    options, the held-out counts and the calibration curve.
    """
    options = options or Stage2Options.from_router_config(cfg.router)
    heldout = heldout_split(cfg, train_set, test_set, options, pool=pool) if options.uses_heldout else None
    if options.router_data == "heldout":
        data, loader = heldout.router, None
        log(f"stage 2 labels from {len(data)} held-out images (per class {data.class_counts().tolist()}), "
            "not the training set (Stage2Options.router_data=heldout)")
    else:
        data = train_set
    start = time.perf_counter()
    trainer = RouterTrainer(cfg, net, data, loader=loader, log=log, stage1_checkpoint=stage1_checkpoint,
                            class_counts=train_set.class_counts())
    trainer.fit()
    threshold, calibration, cost = float(cfg.router.threshold), None, None
    if options.threshold == "auto":
        cost = routed_cost(net, trainer.router, cfg.data.image_size)  # fvcore, part by part: a few seconds
        device = next(net.parameters()).device
        calib_loader = InMemoryLoader(heldout.calibration, cfg.data.eval_batch_size, train=False, device=device,
                                      channels_last=cfg.model.channels_last)
        calibration = calibrate_threshold(net, trainer.router, calib_loader, cost,
                                          max_accuracy_drop=options.max_accuracy_drop, amp=cfg.train.amp)
        threshold = calibration.threshold
        trainer.cfg = update(trainer.cfg, router={"threshold": threshold})
        log(calibration.summary())
    seconds = time.perf_counter() - start
    trainer.stage2_info = {"options": asdict(options), "threshold": threshold,
                           "heldout": heldout.as_dict() if heldout is not None else None,
                           "calibration": calibration.as_dict() if calibration is not None else None}
    return Stage2Result(trainer, threshold, options, heldout, calibration, cost, seconds)


# ---------------------------------------------------------------------------------------------
# command-line flows


def _model_section(model_args: dict) -> dict:
    """The keys of a checkpoint's model_args that the config's model section holds."""
    keys = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in model_args.items() if k in keys}


def _data_for(cfg: Config, net: RIDENet, device: torch.device, datasets=None):
    """(train set, test set, class-balanced training loader, test loader) for a checkpoint's network;
    `datasets` = (train, test) replaces building cfg.data."""
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    if train_set.num_classes != net.num_classes:
        raise ValueError(f"the checkpoint's network has {net.num_classes} classes but data {cfg.data.name} has {train_set.num_classes}")
    return (train_set, test_set, *balanced_loaders(cfg, train_set, test_set, device))


def report_paths(checkpoint: str | Path, json_path: str | Path | None = None) -> tuple[Path, Path]:
    """Where a routed report goes: --json if given, else <checkpoint stem>_eval.json; the PNG beside it."""
    json_path = Path(json_path) if json_path else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_eval.json")
    return json_path, json_path.with_name(f"{json_path.stem.removesuffix('_eval')}_usage.png")


def train_router(cfg: Config, stage1_checkpoint: str | Path, out_path: str | Path | None = None, *,
                 log: Callable[[str], None] = print, evaluate: bool = True, datasets=None,
                 options: Stage2Options | None = None) -> dict:
    """`ride-fast route`: stage 2 on a stage-1 checkpoint; writes the routed checkpoint (default
    <train.out_dir>/routed.pt), then evaluates it (JSON report and usage PNG beside it).
    `datasets` = (train, test) replaces building cfg.data; `options` (see Stage2Options; default
    the spec's stage 2) can train on held-out images and calibrate the threshold. Returns
    {"checkpoint", "seconds", "history", "threshold", "stage2", "report" (a RoutedReport, when evaluated)}."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    ckpt = load_checkpoint(stage1_checkpoint)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{stage1_checkpoint}: no 'model_args' entry; was it written by `ride-fast train` or `ride-fast convert`?")
    net = create_model(**ckpt["model_args"])
    net.load_state_dict(ckpt["model"])
    cfg = update(cfg, model=_model_section(net.model_args))  # the architecture comes from the checkpoint
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    train_set, test_set, train_loader, test_loader = _data_for(cfg, net, device, datasets)
    options = options or Stage2Options.from_router_config(cfg.router)
    log(f"stage 2: routers of {net.name} ({net.num_experts} experts) from {stage1_checkpoint}; "
        f"{cfg.router.epochs} epochs of class-balanced draws, batch {cfg.router.batch_size}, on {device}")
    stage2 = fit_stage2(cfg, net, train_set, test_set, options=options, loader=train_loader, log=log,
                        stage1_checkpoint=str(stage1_checkpoint))
    trainer = stage2.trainer
    out_path = Path(out_path) if out_path else Path(cfg.train.out_dir) / "routed.pt"
    trainer.save(out_path)
    log(f"wrote {out_path} ({stage2.seconds:.1f} s of router training and calibration)")
    result = {"checkpoint": str(out_path), "seconds": stage2.seconds, "history": [asdict(h) for h in trainer.history],
              "threshold": stage2.threshold, "stage2": trainer.stage2_info}
    if evaluate:
        report = evaluate_routed(net, trainer.router, test_loader, trainer.class_counts, image_size=cfg.data.image_size,
                                 threshold=stage2.threshold, amp=cfg.train.amp, cost=stage2.cost)
        json_path, png_path = report_paths(out_path)
        write_report(report, json_path, png_path, extra={"checkpoint": str(out_path), "stage2": trainer.stage2_info})
        log(report.summary())
        log(f"wrote {json_path} and {png_path}")
        result["report"] = report
    return result


def evaluate_routed_checkpoint(checkpoint: str | Path, overrides: dict | None = None, json_path: str | Path | None = None, *,
                               log: Callable[[str], None] = print) -> RoutedReport:
    """`ride-fast eval` on a routed checkpoint: the report, printed and written as JSON + PNG.
    The run's own config (defaults for a converted original checkpoint), then `overrides`
    (e.g. {"router": {"threshold": 0.3}, "data": {"root": ...}})."""
    ckpt = load_checkpoint(checkpoint)
    cfg = update(config_from_dict(ckpt.get("config")), **(overrides or {}))
    cfg = update(cfg, model=_model_section(ckpt["model_args"]))
    device = resolve_device(cfg.train.device)
    net, router, _ = load_routed_checkpoint(checkpoint, device, channels_last=cfg.model.channels_last)
    train_set, _, _, test_loader = _data_for(cfg, net, device)
    report = evaluate_routed(net, router, test_loader, train_set.class_counts(),
                             image_size=cfg.data.image_size, threshold=cfg.router.threshold, amp=cfg.train.amp)
    json_path, png_path = report_paths(checkpoint, json_path)
    write_report(report, json_path, png_path, extra={"checkpoint": str(checkpoint)})
    log(f"{checkpoint}:\n{report.summary()}\nwrote {json_path} and {png_path}")
    return report
