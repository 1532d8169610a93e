"""Two-stage (decoupled) classifiers on a trained network: cRT, tau-normalisation, re-trained cosine heads.

Shape legend: E experts, N images, C classes, D pooled feature width of one expert, T tau grid points.

    features   [E, N, D]   every expert's pooled feature, computed once by the frozen network in
                           eval mode (BatchNorm statistics frozen, no augmentation)
    labels     [N]
    head k     [N, D] -> [N, C]   expert k's classifier; the prediction is the mean over experts

Methods (Kang et al., "Decoupling representation and classifier", ICLR 2020, applied to every
expert of a RIDE network or to a single-expert baseline):

    crt       re-initialise every expert's classifier (of the network's own kind: Linear with bias,
              or cosine with s = 30) and train it on the frozen features with class-balanced
              sampling (pick a class uniformly, then one of its images; an epoch is N draws):
              SGD with momentum 0.9, cosine lr to 0 stepped per epoch, loss = sum over experts
              of cross-entropy.
    cosine    the same with a fresh cosine classifier (s = 30) for every expert, whatever the
              network had (a Linear-head network becomes a cosine-head one).
    tau_norm  no training: w_c <- w_c / ||w_c||^tau for every class vector of every Linear head,
              bias dropped (as Kang et al.'s reference code does), tau from a grid on [0, tau_max]
              chosen by mean per-class accuracy on a validation split. On cosine heads tau-norm
              is a no-op: the forward pass normalises every class vector to unit length, so any
              per-class rescaling cancels exactly (for every tau). The network is then returned
              unchanged, and the report says so; use crt or cosine there.

Validation split for tau (`analysis.val_source`):
    pool   up to val_per_class images per class from the full training data that the long-tailed
           training set left out (mnist_lt, cifar10_lt, cifar100_lt): never seen by the network.
           Found by image content, so it does not depend on how the subset was drawn. Every class
           needs unused images, which the standard MNIST-LT / CIFAR-LT head class (built from all
           of its images) does not have.
    train  a class-stratified split of the training set itself (at most val_per_class images and at
           most half of each class). The stage-1 network was trained on those images, so tau is
           chosen on data it has seen.
    auto   (default) pool for every class that has unused images, the training set for the others
           (in the standard sets: the head class alone); the report lists those classes.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ride_fast.analysis.common import (
    SPLIT_NAMES,
    Loaded,
    collect_outputs,
    eval_loader,
    load_analysis_checkpoint,
    split_summary,
    write_json,
)
from ride_fast.config import Config, config_to_dict, update
from ride_fast.data import ArrayDataset, ClassBalancedSampler, build_datasets
from ride_fast.engine import SplitAccuracy, atomic_save
from ride_fast.io import pyplot, save_figure
from ride_fast.models import CosineHead, RIDENet
from ride_fast.models.heads import COSINE_SCALE

METHODS = ("crt", "tau_norm", "cosine")
POOL_DATASETS = ("mnist_lt", "cifar10_lt", "cifar100_lt")


@dataclass
class FeatureSet:
    """Frozen features of a data set (on the CPU)."""

    features: Tensor  # [E, N, D] float32
    labels: Tensor  # [N] int64


def extract_features(model: RIDENet, loader, amp: str = "none") -> FeatureSet:
    """Every expert's pooled feature for every image of `loader`, network in eval mode."""
    out = collect_outputs(model, loader, features=True, amp=amp)
    return FeatureSet(out.features, out.labels)


# ---------------------------------------------------------------------------------------------
# heads


def is_cosine_head(head: nn.Module) -> bool:
    """A classifier that normalises its class vectors in the forward (NormedLinear / CosineHead)."""
    return hasattr(head, "weight") and not isinstance(head, nn.Linear)


def new_heads(model: RIDENet, cosine: bool) -> list[nn.Module]:
    """Fresh classifiers, one per expert: CosineHead(D, C, s=30) or nn.Linear(D, C) (PyTorch init)."""
    D, C = model.feature_dim, model.num_classes
    return [CosineHead(D, C, COSINE_SCALE) if cosine else nn.Linear(D, C) for _ in range(model.num_experts)]


def heads_logits(heads, features: Tensor) -> Tensor:
    """[E, N, C] logits of every expert's head on its own features [E, N, D]."""
    if len(heads) != features.shape[0]:
        raise ValueError(f"{len(heads)} heads for features of {features.shape[0]} experts")
    return torch.stack([h(f) for h, f in zip(heads, features)])


def cosine_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Cosine annealing to 0 stepped per epoch (epochs from 1)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def train_heads(
    heads: list[nn.Module],
    data: FeatureSet,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    sampler: str = "balanced",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train `heads` in place on frozen features: sum over experts of cross-entropy; returns per-epoch
    {epoch, lr, loss, train_acc}. sampler: "balanced" (class-balanced draws, N per epoch) or "shuffle"."""
    if epochs < 1:
        raise ValueError(f"analysis.two_stage_epochs must be >= 1, got {epochs}")
    if sampler not in ("balanced", "shuffle"):
        raise ValueError(f"analysis.two_stage_sampler must be 'balanced' or 'shuffle', got {sampler!r}")
    features, labels = data.features, data.labels  # the heads train where the features are
    N = labels.shape[0]
    for h in heads:
        h.to(features.device)
    C = heads[0].weight.shape[0] if isinstance(heads[0], nn.Linear) else heads[0].weight.shape[1]
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    balanced = ClassBalancedSampler(labels.cpu().numpy(), C, seed=seed) if sampler == "balanced" else None
    gen = torch.Generator().manual_seed(seed)
    history = []
    for h in heads:
        h.train()
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(epoch, lr, epochs)
        if balanced is not None:
            balanced.set_epoch(epoch)
            order = torch.from_numpy(balanced.indices())
        else:
            order = torch.randperm(N, generator=gen)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(features.device)
            y = labels[idx]
            logits = heads_logits(heads, features[:, idx])  # [E, b, C]
            loss = sum(F.cross_entropy(z, y) for z in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)  # host read per step: a head-only step is tiny
            correct += int((logits.detach().mean(0).argmax(1) == y).sum())
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": loss_sum / len(order), "train_acc": 100.0 * correct / len(order)}
        history.append(record)
        if log:
            log(f"  epoch {epoch:3d}  lr {record['lr']:.4f}  loss {record['loss']:.4f}  train acc (sampled) {record['train_acc']:.1f}")
    for h in heads:
        h.eval()
    return history  # heads stay on the features' device


@torch.no_grad()
def tau_normalize(head: nn.Module, tau: float) -> nn.Linear:
    """A new Linear head with weight rows w_c / ||w_c||^tau and no bias (tau = 0: the weights as
    they are, bias dropped). Cosine heads cannot be tau-normalised (see the module docstring)."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"tau-normalisation needs a Linear head; {type(head).__name__} normalises its class vectors itself (a no-op)")
    w = head.weight  # [C, D]
    out = nn.Linear(head.in_features, head.out_features, bias=False).to(w.device)
    out.weight.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau))
    return out.eval()


def balanced_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean per-class accuracy (percent) over the classes present in `labels`."""
    pred = logits.argmax(1)
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    return float(100.0 * (correct[present] / total[present]).mean())


@torch.no_grad()
def tau_curve(heads, val: FeatureSet, grid) -> list[tuple[float, float]]:
    """(tau, validation mean per-class accuracy) for every tau of `grid`."""
    C = heads[0].out_features
    return [(float(t), balanced_accuracy(heads_logits([tau_normalize(h, t) for h in heads], val.features).mean(0), val.labels, C))
            for t in grid]


def choose_tau(curve: list[tuple[float, float]]) -> float:
    """The tau of the best validation accuracy (the smallest such tau on ties, up to float rounding:
    per-class means of different counts can differ in the last bit)."""
    best = max(acc for _, acc in curve)
    return min(t for t, acc in curve if acc >= best - 1e-9)


# ---------------------------------------------------------------------------------------------
# validation split


def _image_keys(images: Tensor) -> list[bytes]:
    """A content digest per image (uint8 [N, K, H, W])."""
    flat = np.ascontiguousarray(images.numpy()).reshape(images.shape[0], -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def unused_pool_images(train_set: ArrayDataset, pool: ArrayDataset) -> np.ndarray:
    """Indices of the pool images whose content is not in `train_set`."""
    seen = set(_image_keys(train_set.images))
    return np.asarray([i for i, k in enumerate(_image_keys(pool.images)) if k not in seen], dtype=np.int64)


def _subset(ds: ArrayDataset, idx: np.ndarray, name: str) -> ArrayDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return dataclasses.replace(ds, images=ds.images[t], labels=ds.labels[t], name=name)


def _per_class_pick(labels: np.ndarray, candidates: np.ndarray, num_classes: int, take, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = candidates[labels[candidates] == c]
        out.append(np.sort(rng.permutation(idx)[: take(len(idx))]))
    return np.concatenate(out)


@dataclass
class Validation:
    """The validation split for tau: `dataset`, where it came from, and the classes it took from the
    training set (images the stage-1 network was trained on)."""

    dataset: ArrayDataset
    source: str  # "pool", "pool+train" (auto: classes with no unused image fall back to the training set) or "train"
    seen_classes: list[int]

    def as_dict(self) -> dict:
        return {"source": self.source, "images": len(self.dataset), "per_class": self.dataset.class_counts().tolist(),
                "classes_from_training_set": self.seen_classes}


def validation_split(cfg: Config, train_set, *, source: str | None = None, pool=None) -> Validation:
    """The validation split following `analysis.val_source` (see the module docstring).

    pool: up to val_per_class unused images per class (every class must have some); train: up to
    val_per_class and at most half of each class from the training set; auto: pool per class, and
    the training set for the classes that have no unused image (the head class of MNIST-LT and
    CIFAR-LT takes all of its images). `pool` = the full training data replaces building it."""
    a = cfg.analysis
    source = source or a.val_source
    if source not in ("auto", "pool", "train"):
        raise ValueError(f"analysis.val_source must be auto, pool or train, got {source!r}")
    if a.val_per_class < 1:
        raise ValueError(f"analysis.val_per_class must be >= 1, got {a.val_per_class}")
    if not isinstance(train_set, ArrayDataset):
        raise TypeError(f"tau selection needs an in-memory training set; {train_set.name} is read from files")
    C = train_set.num_classes
    train_labels = train_set.labels.numpy()
    from_train = lambda n: min(a.val_per_class, n // 2)
    if source in ("auto", "pool"):
        if pool is None and cfg.data.name in POOL_DATASETS:
            pool = build_datasets(dataclasses.replace(cfg.data, imbalance_factor=1.0))[0]
        if pool is None:
            if source == "pool":
                raise ValueError(f"analysis.val_source=pool needs the full training data of {', '.join(POOL_DATASETS)}; "
                                 f"data.name={cfg.data.name} has none; use analysis.val_source=train")
        else:
            unused = unused_pool_images(train_set, pool)
            labels = pool.labels.numpy()
            have = np.bincount(labels[unused], minlength=C)
            missing = np.flatnonzero(have == 0)
            if source == "pool" and len(missing):
                raise ValueError(f"analysis.val_source=pool: classes {missing.tolist()[:10]} have no image outside the training "
                                 "set; use analysis.val_source=auto (those classes then use training images) or train")
            val = _subset(pool, _per_class_pick(labels, unused, C, lambda n: min(n, a.val_per_class), cfg.train.seed),
                          f"{pool.name}/unused")
            if not len(missing):
                return Validation(val, "pool", [])
            cand = np.flatnonzero(np.isin(train_labels, missing))
            seen = _subset(train_set, _per_class_pick(train_labels, cand, C, from_train, cfg.train.seed), "")
            both = dataclasses.replace(val, images=torch.cat([val.images, seen.images]), labels=torch.cat([val.labels, seen.labels]),
                                       name=f"{pool.name}/unused+train")
            return Validation(both, "pool+train", missing.tolist())
    idx = _per_class_pick(train_labels, np.arange(len(train_labels)), C, from_train, cfg.train.seed)
    if len(idx) == 0:
        raise ValueError("the training set has no class with 2 or more images to hold out for validation")
    val = _subset(train_set, idx, f"{train_set.name}/val")
    return Validation(val, "train", sorted(set(val.labels.tolist())))


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass
class TwoStageResult:
    """Accuracy before and after re-balancing the classifiers of a network (percent)."""

    method: str
    before: SplitAccuracy
    after: SplitAccuracy
    tau: float | None = None
    tau_curve: list[tuple[float, float]] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    note: str = ""
    checkpoint: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "before": self.before.as_dict(with_per_class=True),
                "after": self.after.as_dict(with_per_class=True), "tau": self.tau,
                "tau_curve": [{"tau": t, "val_accuracy": a} for t, a in self.tau_curve], "validation": self.validation,
                "history": self.history, "note": self.note, "checkpoint": self.checkpoint, "seconds": self.seconds}

    def summary(self) -> str:
        rows = [f"{'':<10}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}"]
        for name, a in (("before", self.before), (self.method, self.after)):
            rows.append(f"{name:<10}{a.overall:>9.2f}{a.many:>8.2f}{a.medium:>8.2f}{a.few:>8.2f}")
        if self.tau is not None:
            rows.append(f"tau = {self.tau:g} (validation: {self.validation.get('source')}, {self.validation.get('images')} images)")
        if self.note:
            rows.append(self.note)
        return "\n".join(rows)


def with_heads(model: RIDENet, heads: list[nn.Module], cosine: bool) -> tuple[RIDENet, dict]:
    """A copy of `model` with new heads and the model_args that rebuild it."""
    net = copy.deepcopy(model)
    net.heads = nn.ModuleList(heads).to(next(model.parameters()).device)
    args = dict(model.model_args)
    args["use_norm"] = bool(cosine)
    net.scale = COSINE_SCALE if cosine else 1.0
    return net.eval(), args


def run_two_stage(
    checkpoint: str | Path,
    method: str,
    *,
    out_dir: str | Path | None = None,
    overrides: dict | None = None,
    datasets=None,
    pool=None,
    log: Callable[[str], None] = print,
) -> TwoStageResult:
    """Apply `method` (crt | tau_norm | cosine) to a checkpoint; write <stem>_<method>.json / .png and,
    when the classifiers changed, the checkpoint <stem>_<method>.pt (loadable by `ride-fast eval`).

    `datasets` = (train, test) and `pool` (full training data) replace building them (tests)."""
    if method not in METHODS:
        raise ValueError(f"two-stage method must be one of {', '.join(METHODS)}, got {method!r}")
    start = time.perf_counter()
    loaded: Loaded = load_analysis_checkpoint(checkpoint, overrides, datasets=datasets)
    cfg, model, a = loaded.cfg, loaded.model, loaded.cfg.analysis
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent
    stem = f"{Path(checkpoint).stem}_{method}"
    C = model.num_classes
    if not loaded.train_matches:
        raise ValueError(f"{checkpoint}: the training set rebuilt from its config ({cfg.data.name}) does not have the class counts "
                         "the checkpoint was trained with (a bias-variance draw?); pass that data set's config as overrides")
    cosine_now = all(is_cosine_head(h) for h in model.heads)
    if "router_state" in loaded.ckpt:
        log("note: the router of this routed checkpoint is left out (it was trained on the old classifiers)")

    test = extract_features(model, eval_loader(cfg, loaded.test_set, loaded.device), cfg.train.amp)
    before = split_summary(heads_logits(_cpu_heads(model), test.features).mean(0).argmax(1), test.labels, loaded.class_counts, C)
    result = TwoStageResult(method, before, before)
    heads = None
    if method == "tau_norm":
        if cosine_now:
            result.note = ("tau-norm is a no-op on cosine classifiers: they normalise every class vector to unit length in the "
                           "forward pass, so rescaling w_c by 1/||w_c||^tau cancels for every tau. The network is unchanged; "
                           "use --method crt or cosine to re-balance it.")
        else:
            split = validation_split(cfg, loaded.train_set, pool=pool)
            val = extract_features(model, eval_loader(cfg, split.dataset, loaded.device), cfg.train.amp)
            grid = np.round(np.linspace(0.0, a.tau_max, max(a.tau_steps, 2)), 10)
            base = _cpu_heads(model)
            result.tau_curve = tau_curve(base, val, grid)
            result.tau = choose_tau(result.tau_curve)
            result.validation = split.as_dict()
            heads = [tau_normalize(h, result.tau) for h in base]
            if split.seen_classes:
                result.note = (f"tau was chosen on a validation split whose classes {split.seen_classes[:10]}"
                               f"{' ...' if len(split.seen_classes) > 10 else ''} come from the training set (images the "
                               "stage-1 network was trained on).")
    else:
        cosine = method == "cosine" or cosine_now
        train = extract_features(model, eval_loader(cfg, loaded.train_set, loaded.device), cfg.train.amp)
        torch.manual_seed(cfg.train.seed)
        heads = new_heads(model, cosine)
        log(f"{method}: {'cosine' if cosine else 'linear'} classifiers of {model.num_experts} expert(s) re-trained on frozen features "
            f"of {len(train.labels)} images, {a.two_stage_sampler} sampling, {a.two_stage_epochs} epochs")
        train = FeatureSet(train.features.to(loaded.device), train.labels.to(loaded.device))
        result.history = train_heads(heads, train, epochs=a.two_stage_epochs, lr=a.two_stage_lr, batch_size=a.two_stage_batch_size,
                                     weight_decay=a.two_stage_weight_decay, sampler=a.two_stage_sampler, seed=cfg.train.seed, log=log)
    if heads is not None:
        heads = [h.cpu() for h in heads]
        with torch.no_grad():
            result.after = split_summary(heads_logits(heads, test.features).mean(0).argmax(1), test.labels, loaded.class_counts, C)
        cosine_heads = all(is_cosine_head(h) for h in heads)
        net, args = with_heads(model, heads, cosine_heads)
        if not cosine_heads and any(isinstance(h, nn.Linear) and h.bias is None for h in heads):
            net = _linear_with_zero_bias(net)  # create_model's Linear heads carry a bias: store it as zeros
        ckpt_cfg = update(cfg, model=args)
        path = atomic_save({"model": net.state_dict(), "model_args": args, "config": config_to_dict(ckpt_cfg),
                            "class_counts": [int(c) for c in loaded.class_counts], "epoch": int(loaded.ckpt.get("epoch", 0)),
                            "two_stage": {"method": method, "tau": result.tau, "source_checkpoint": str(checkpoint)}},
                           out_dir / f"{stem}.pt")
        result.checkpoint = str(path)
    result.seconds = time.perf_counter() - start
    write_json({**result.as_dict(), "source_checkpoint": str(checkpoint)}, out_dir / f"{stem}.json")
    plot_two_stage(result, out_dir / f"{stem}.png")
    log(result.summary())
    log(f"wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.png')}" + (f" and {result.checkpoint}" if result.checkpoint else ""))
    return result


def _cpu_heads(model: RIDENet) -> list[nn.Module]:
    return [copy.deepcopy(h).float().cpu().eval() for h in model.heads]


def _linear_with_zero_bias(net: RIDENet) -> RIDENet:
    heads = []
    for h in net.heads:
        new = nn.Linear(h.in_features, h.out_features).to(h.weight.device)
        with torch.no_grad():
            new.weight.copy_(h.weight)
            new.bias.zero_()
        heads.append(new)
    net.heads = nn.ModuleList(heads)
    return net


def plot_two_stage(result: TwoStageResult, path: str | Path) -> Path:
    """Accuracy per split before / after; for tau-norm also the validation curve over tau."""
    plt = pyplot()
    panels = 2 if result.tau_curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), dpi=120, squeeze=False)
    ax = axes[0, 0]
    splits = [*SPLIT_NAMES, "overall"]
    x = np.arange(len(splits))
    for i, (name, acc) in enumerate((("before", result.before), (result.method, result.after))):
        vals = [getattr(acc, s) for s in splits]
        ax.bar(x + (i - 0.5) * 0.38, np.nan_to_num(vals), 0.38, label=name)
    ax.set_xticks(x, splits)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"two-stage: {result.method}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if result.tau_curve:
        ax = axes[0, 1]
        taus, accs = zip(*result.tau_curve)
        ax.plot(taus, accs, marker="o", markersize=3)
        ax.axvline(result.tau, color="grey", linestyle=":", label=f"chosen tau = {result.tau:g}")
        ax.set_xlabel("tau")
        ax.set_ylabel("validation mean per-class accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
