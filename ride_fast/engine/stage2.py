"""Stage 2 (docs/method.md §5): train the routers of a frozen stage-1 network.

Shape legend: B images, E experts, R = E - 1 routers, C classes, D pooled feature width.

Every stage-1 parameter is frozen and BatchNorm stays in eval mode, so per batch the frozen network
runs once, without autograd (and under bf16 autocast with train.amp=bf16), with all experts:
expert_logits [E, B, C] and features [E, B, D] give the router labels and the inputs of all R
routers at once; only the routers get gradients. The routers read the running mean logits divided
by the network's classifier scale s (`build_router`; fed raw, the published SGD step overshoots,
docs/method.md §5). Batches come from the class-balanced sampler (epoch = N draws) with the stage-1
training augmentation; SGD with Nesterov momentum, cosine lr to 0 stepped per epoch. Each epoch
logs, per router, its loss, positive share, call share, precision and recall.

`fit_stage2` trains the routers as the router config section says: on the training set (the
published recipe) or on held-out images (router.router_data=heldout), and with router.threshold or
a threshold chosen from the accuracy-cost curve of held-out images (router.calibrate_threshold;
engine/calibration.py). It returns the threshold
it chose; the routed checkpoint stores it once (engine/checkpoint.py). `train_router` is
`ride-fast route`: stage 2 on a stage-1 checkpoint, then the routed evaluation (engine/routed_eval.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ride_fast.config import Config, RouterConfig, update
from ride_fast.data import InMemoryLoader, build_datasets, build_loaders, choose_loader
from ride_fast.engine.calibration import HELDOUT_DATASETS, HeldOut, ThresholdCalibration, calibrate_threshold, heldout_split
from ride_fast.engine.checkpoint import (
    check_data_classes,
    checkpoint_config,
    load_checkpoint,
    model_section,
    network_from_checkpoint,
    require_data,
    routed_checkpoint,
    save_routed_checkpoint,
)
from ride_fast.engine.monitor import info, progress, startup_summary
from ride_fast.engine.routed_cost import RoutedCost, routed_cost
from ride_fast.engine.routed_eval import evaluate_routed, report_paths, write_report
from ride_fast.engine.runtime import autocast_context, resolve_amp, resolve_device, seed_everything, synchronize
from ride_fast.io import plural
from ride_fast.models import RIDENet
from ride_fast.router import Router, router_step

# the router keys that say where stage 2 takes its labels and its threshold from (stored with the checkpoint)
STAGE2_OPTIONS = ("router_data", "heldout_per_class", "calibrate_threshold", "max_accuracy_drop", "calibration_per_class",
                  "calibration_z")


def build_router(cfg: RouterConfig, net: RIDENet) -> Router:
    """A Router sized for `net` from the router section of the config; its top-k inputs are the
    running mean logits divided by the network's classifier scale s (see ride_fast.router.module)."""
    return Router(net.num_experts, net.feature_dim, net.num_classes, top_k=cfg.top_k, hidden=cfg.hidden, share_fc=cfg.share_fc,
                  logit_scale=net.scale)


def router_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Cosine annealing to 0 over `epochs`, stepped per epoch (epoch counted from 1):
    base_lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, as CosineAnnealingLR(T_max=epochs)."""
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def freeze(net: nn.Module) -> nn.Module:
    """Stage-1 network for stage 2: no parameter trains, BatchNorm in eval mode."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


@dataclass
class RouterEpochResult:
    """One stage-2 epoch. Shares are fractions of the images seen; lists hold one entry per router
    (router i decides on expert i + 1). A call is sigmoid(r) > router.threshold."""

    epoch: int
    lr: float
    loss: float
    label_share: list[float]  # images whose label says "call the next expert"
    call_share: list[float]  # images the router sends on (sigmoid(r) > threshold)
    router_accuracy: list[float]  # decision == label
    seconds: float
    images_per_s: float
    router_loss: list[float] = dataclasses.field(default_factory=list)  # each router's weighted BCE (their mean is `loss`)
    precision: list[float] = dataclasses.field(default_factory=list)  # of the calls, the share labelled positive (NaN: no call)
    recall: list[float] = dataclasses.field(default_factory=list)  # of the positives, the share called (NaN: no positive)


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
    (held-out data, router.router_data=heldout).
    """

    def __init__(
        self,
        cfg: Config,
        net: RIDENet,
        train_set,
        *,
        loader=None,
        router: Router | None = None,
        log: Callable[[str], None] = info,
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
        loss_sum = torch.zeros(R, device=self.device)
        true_pos = torch.zeros(R, device=self.device)
        label_pos = torch.zeros(R, device=self.device)
        call_pos = torch.zeros(R, device=self.device)
        agree = torch.zeros(R, device=self.device)
        seen = 0
        steps = len(self.loader)
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        start = time.perf_counter()
        batches = progress(self.loader, f"router epoch {epoch}/{self.cfg.router.epochs}", total=steps, enabled=self.cfg.train.progress)
        for step, batch in enumerate(batches):
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
                logits = result.router_logits.detach().float()
                calls = torch.sigmoid(logits) > rc.threshold
                loss_sum += F.binary_cross_entropy_with_logits(logits, result.labels.float(), pos_weight=logits.new_full((), rc.w_on),
                                                               reduction="none").sum(1)
                true_pos += (calls & result.labels).sum(1)
                label_pos += result.labels.sum(1)
                call_pos += calls.sum(1)
                agree += (calls == result.labels).sum(1)
            seen += n
        synchronize(self.device)
        seconds = time.perf_counter() - start
        share = lambda t: [float(v) / max(seen, 1) for v in t.cpu()]  # noqa: E731  (the epoch's host reads)
        losses = share(loss_sum)
        mean_loss = sum(losses) / R
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"router epoch {epoch}: the loss is {mean_loss}; lower router.lr")
        ratio = lambda a, b: [float(x) / float(y) if y > 0 else float("nan") for x, y in zip(a.cpu(), b.cpu())]  # noqa: E731
        return RouterEpochResult(epoch, lr, mean_loss, share(label_pos), share(call_pos), share(agree), seconds, seen / max(seconds, 1e-9),
                                 losses, ratio(true_pos, call_pos), ratio(true_pos, label_pos))

    def fit(self) -> list[RouterEpochResult]:
        for epoch in range(len(self.history) + 1, self.cfg.router.epochs + 1):
            r = self.train_epoch(epoch)
            self.history.append(r)
            pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
            self.log(
                f"router epoch {epoch}/{self.cfg.router.epochs}  lr {r.lr:.4f}  loss {r.loss:.4f} "
                f"({'/'.join(f'{x:.3f}' for x in r.router_loss)})  positive {pct(r.label_share)}%  called {pct(r.call_share)}%  "
                f"precision {pct(r.precision)}%  recall {pct(r.recall)}%  {r.images_per_s:,.0f} img/s"
            )
        return self.history

    def checkpoint(self, threshold: float | None = None, stage2: dict | None = None) -> dict:
        """The routed checkpoint; `threshold` (default router.threshold) is the one to route with."""
        threshold = self.cfg.router.threshold if threshold is None else threshold
        return routed_checkpoint(self.net, self.router, self.cfg, threshold, self.class_counts, self.history,
                                 self.stage1_checkpoint, stage2)

    def save(self, path: str | Path, threshold: float | None = None, stage2: dict | None = None) -> Path:
        """Write the routed model atomically, and its config beside it (see `checkpoint`)."""
        return save_routed_checkpoint(self.checkpoint(threshold, stage2), path)


@dataclass
class Stage2Result:
    """Trained routers and the threshold to route with (router.threshold, or the calibrated one)."""

    trainer: RouterTrainer
    threshold: float
    heldout: HeldOut | None
    calibration: ThresholdCalibration | None
    cost: RoutedCost | None  # counted (fvcore) only when the calibration needed it
    seconds: float  # router training and calibration

    @property
    def router(self) -> Router:
        return self.trainer.router

    @property
    def info(self) -> dict:
        """What the routed checkpoint records of stage 2: the options, held-out counts, calibration curve."""
        return {"options": {k: getattr(self.trainer.cfg.router, k) for k in STAGE2_OPTIONS},
                "heldout": self.heldout.as_dict() if self.heldout is not None else None,
                "calibration": self.calibration.as_dict() if self.calibration is not None else None}

    def save(self, path: str | Path) -> Path:
        """The routed checkpoint, routing with `threshold`, and its config beside it."""
        return self.trainer.save(path, self.threshold, self.info)


def fit_stage2(cfg: Config, net: RIDENet, train_set, test_set=None, *, loader=None, log: Callable[[str], None] = info,
               stage1_checkpoint: str = "", pool=None) -> Stage2Result:
    """Train the routers of `net` (frozen) and settle the threshold, as cfg.router says (see the
    module docstring); returns the threshold chosen in the result.

    `loader` replaces the class-balanced loader of the training set (router.router_data=train only);
    `test_set` keeps test images out of the held-out data; `pool` = the full training data.
    Every generator is seeded from train.seed first, so the routers depend on `net` and the seed
    alone, not on what the process drew before (a demo that has just trained, or a script that
    loaded the network from a checkpoint, get the same stage 2).
    """
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rc = cfg.router
    heldout = heldout_split(cfg, train_set, test_set, pool=pool) if rc.uses_heldout else None
    if rc.router_data == "heldout":
        data, loader = heldout.router, None
        log(f"stage 2 labels from {len(data)} held-out images (per class {data.class_counts().tolist()}), "
            "not the training set (router.router_data=heldout)")
    else:
        data = train_set
    start = time.perf_counter()
    trainer = RouterTrainer(cfg, net, data, loader=loader, log=log, stage1_checkpoint=stage1_checkpoint,
                            class_counts=train_set.class_counts())
    trainer.fit()
    threshold, calibration, cost = float(rc.threshold), None, None
    if rc.calibrate_threshold:
        cost = routed_cost(net, trainer.router, cfg.data.image_size)  # fvcore, part by part: a few seconds
        device = next(net.parameters()).device
        calib_loader = InMemoryLoader(heldout.calibration, cfg.data.eval_batch_size, train=False, device=device,
                                      channels_last=cfg.model.channels_last)
        calibration = calibrate_threshold(net, trainer.router, calib_loader, cost, max_accuracy_drop=rc.max_accuracy_drop,
                                          grid=None, amp=cfg.train.amp, z=rc.calibration_z)
        threshold = calibration.threshold
        log(calibration.summary())
    return Stage2Result(trainer, threshold, heldout, calibration, cost, time.perf_counter() - start)


def route_config(ckpt: dict, source: str | Path, settings: dict | None = None, *,
                 log: Callable[[str], None] = info) -> Config:
    """The config `ride-fast route` runs with: the stage-1 checkpoint's own (architecture, data,
    router section), then `settings` (the keys a --config recipe and the overrides set). A checkpoint
    without a data config needs data options; a model key that contradicts the checkpoint's
    architecture is named in a warning (the checkpoint's value is used)."""
    require_data(ckpt, source, settings, "route")
    architecture = model_section(ckpt.get("model_args") or {})
    for key, value in ((settings or {}).get("model") or {}).items():
        if key in architecture and value != architecture[key]:
            log(f"warning: model.{key}={value} does not apply to `ride-fast route`: the architecture comes from {source} "
                f"(model.{key}={architecture[key]}); ignored")
    return checkpoint_config(ckpt, settings)


def check_stage2(cfg: Config, model_args: dict, source: str | Path) -> None:
    """Every check of stage 2 that needs no data, run before any work: experts to route between,
    router.top_k within the classes, held-out options only on data sets that leave images out."""
    experts, classes = int(model_args.get("num_experts", 0)), int(model_args.get("num_classes", 0))
    if experts < 2:
        raise ValueError(f"{source}: stage 2 routes between experts, and this checkpoint has {experts} "
                         f"(model.num_experts={experts}); route a RIDE checkpoint with 2 or more experts")
    if not 1 <= cfg.router.top_k <= classes:
        raise ValueError(f"router.top_k={cfg.router.top_k} must lie in 1..{classes} (the classes of {source}); "
                         f"set router.top_k={min(classes, 30)}")
    if cfg.router.uses_heldout and cfg.data.name not in HELDOUT_DATASETS:
        keys = [k for k, on in (("router.router_data=heldout", cfg.router.router_data == "heldout"),
                                ("router.calibrate_threshold=true", cfg.router.calibrate_threshold)) if on]
        raise ValueError(f"{' and '.join(keys)} need{'' if len(keys) > 1 else 's'} images the long-tailed training set "
                         f"leaves out, which only {', '.join(HELDOUT_DATASETS)} have (data.name={cfg.data.name}); "
                         "use router.router_data=train router.calibrate_threshold=false")


def train_router(cfg: Config, stage1_checkpoint: str | Path, out_path: str | Path | None = None, *,
                 log: Callable[[str], None] = info, evaluate: bool = True, datasets=None) -> dict:
    """`ride-fast route`: stage 2 on a stage-1 checkpoint (as cfg.router says); writes the routed
    checkpoint (default <train.out_dir>/routed.pt), then evaluates it (JSON report and usage PNG
    beside it). `datasets` = (train, test) replaces building cfg.data. Returns {"checkpoint",
    "seconds", "history", "threshold", "stage2", "report" (a RoutedReport, when evaluated)}."""
    ckpt = load_checkpoint(stage1_checkpoint)
    if "model_args" in ckpt:
        cfg = update(cfg, model=model_section(ckpt["model_args"]))  # the architecture comes from the checkpoint
        check_stage2(cfg, ckpt["model_args"], stage1_checkpoint)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    net = network_from_checkpoint(ckpt, stage1_checkpoint)
    net = net.to(device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    train_set, test_set = datasets if datasets is not None else build_datasets(cfg.data)
    check_data_classes(stage1_checkpoint, net.num_classes, cfg.data.name, train_set.num_classes)
    train_loader, test_loader = balanced_loaders(cfg, train_set, test_set, device)
    log(startup_summary("route", data=cfg.data.name, num_classes=train_set.num_classes, train_images=len(train_set),
                        test_images=len(test_set), loader=choose_loader(cfg.data, train_set), device=device,
                        amp=resolve_amp(cfg.train.amp, device), amp_setting=cfg.train.amp, batch=cfg.router.batch_size,
                        out=Path(out_path) if out_path else Path(cfg.train.out_dir) / "routed.pt"))
    log(f"stage 2: routers of {net.name} ({plural(net.num_experts, 'expert')}) from {stage1_checkpoint}; "
        f"{plural(cfg.router.epochs, 'epoch')} of class-balanced draws, batch {cfg.router.batch_size}, on {device}")
    stage2 = fit_stage2(cfg, net, train_set, test_set, loader=train_loader, log=log, stage1_checkpoint=str(stage1_checkpoint))
    out_path = Path(out_path) if out_path else Path(cfg.train.out_dir) / "routed.pt"
    stage2.save(out_path)
    log(f"wrote {out_path} ({stage2.seconds:.1f} s of router training and calibration)")
    result = {"checkpoint": str(out_path), "seconds": stage2.seconds, "history": [asdict(h) for h in stage2.trainer.history],
              "threshold": stage2.threshold, "stage2": stage2.info}
    if evaluate:
        report = evaluate_routed(net, stage2.router, test_loader, stage2.trainer.class_counts, image_size=cfg.data.image_size,
                                 threshold=stage2.threshold, amp=cfg.train.amp, cost=stage2.cost)
        json_path, png_path = report_paths(out_path)
        write_report(report, json_path, png_path, extra={"checkpoint": str(out_path), "stage2": stage2.info})
        log(report.summary())
        log(f"wrote {json_path} and {png_path}")
        result["report"] = report
    return result
