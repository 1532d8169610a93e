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

The classifier parts are in ride_fast.analysis.frozen_heads, the validation split for tau (and
`analysis.val_source`) in ride_fast.analysis.tau_validation; this module runs a recipe on a
checkpoint and writes its report, plot and re-balanced checkpoint.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ride_fast.analysis.common import SPLIT_NAMES, Loaded, eval_loader, load_analysis_checkpoint, split_summary, write_json
from ride_fast.analysis.frozen_heads import (
    FeatureSet,
    choose_tau,
    extract_features,
    heads_logits,
    is_cosine_head,
    new_heads,
    tau_curve,
    tau_normalize,
    train_heads,
)
from ride_fast.analysis.tau_validation import validation_split
from ride_fast.config import config_to_dict, update
from ride_fast.engine import SplitAccuracy, atomic_save
from ride_fast.engine.metrics import pct
from ride_fast.engine.monitor import info
from ride_fast.io import pyplot, save_figure
from ride_fast.models import RIDENet
from ride_fast.models.heads import COSINE_SCALE

METHODS = ("crt", "tau_norm", "cosine")


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
            rows.append(f"{name:<10}{a.overall:>9.2f}{pct(a.many, '>8.2f')}{pct(a.medium, '>8.2f')}{pct(a.few, '>8.2f')}")
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
    log: Callable[[str], None] = info,
) -> TwoStageResult:
    """Apply `method` (crt | tau_norm | cosine) to a checkpoint; write <stem>_<method>.json / .png and,
    when the classifiers changed, the checkpoint <stem>_<method>.pt (loadable by `ride-fast eval`).

    `datasets` = (train, test) and `pool` (full training data) replace building them (tests)."""
    if method not in METHODS:
        raise ValueError(f"two-stage method must be one of {', '.join(METHODS)}, got {method!r}")
    start = time.perf_counter()
    loaded: Loaded = load_analysis_checkpoint(checkpoint, overrides, datasets=datasets, command="analyze two-stage")
    cfg, model = loaded.cfg, loaded.model
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
    if method == "tau_norm" and cosine_now:
        heads = None
        result.note = ("tau-norm is a no-op on cosine classifiers: they normalise every class vector to unit length in the "
                       "forward pass, so rescaling w_c by 1/||w_c||^tau cancels for every tau. The network is unchanged; "
                       "use --method crt or cosine to re-balance it.")
    elif method == "tau_norm":
        heads = _tau_norm_heads(result, loaded, pool)
    else:
        heads = _retrained_heads(result, loaded, cosine=method == "cosine" or cosine_now, log=log)
    if heads is not None:
        heads = [h.cpu() for h in heads]
        with torch.no_grad():
            result.after = split_summary(heads_logits(heads, test.features).mean(0).argmax(1), test.labels, loaded.class_counts, C)
        result.checkpoint = str(_save_rebalanced(loaded, heads, result, checkpoint, out_dir / f"{stem}.pt"))
    result.seconds = time.perf_counter() - start
    write_json({**result.as_dict(), "source_checkpoint": str(checkpoint), "data": cfg.data.name}, out_dir / f"{stem}.json")
    plot_two_stage(result, out_dir / f"{stem}.png")
    log(result.summary())
    log(f"wrote {out_dir / (stem + '.json')}, {out_dir / (stem + '.png')}" + (f" and {result.checkpoint}" if result.checkpoint else ""))
    return result


def _tau_norm_heads(result: TwoStageResult, loaded: Loaded, pool) -> list[nn.Module]:
    """tau-normalised copies of the network's Linear heads, tau chosen on the validation split;
    fills result.tau, tau_curve, validation and, when the split holds training images, note."""
    cfg, model, a = loaded.cfg, loaded.model, loaded.cfg.analysis
    split = validation_split(cfg, loaded.train_set, pool=pool)
    val = extract_features(model, eval_loader(cfg, split.dataset, loaded.device), cfg.train.amp)
    grid = np.round(np.linspace(0.0, a.tau_max, max(a.tau_steps, 2)), 10)
    base = _cpu_heads(model)
    result.tau_curve = tau_curve(base, val, grid)
    result.tau = choose_tau(result.tau_curve)
    result.validation = split.as_dict()
    if split.seen_classes:
        result.note = (f"tau was chosen on a validation split whose classes {split.seen_classes[:10]}"
                       f"{' ...' if len(split.seen_classes) > 10 else ''} come from the training set (images the "
                       "stage-1 network was trained on).")
    return [tau_normalize(h, result.tau) for h in base]


def _retrained_heads(result: TwoStageResult, loaded: Loaded, *, cosine: bool, log: Callable[[str], None]) -> list[nn.Module]:
    """Fresh heads (cosine or Linear) trained on the frozen training features (cRT); fills result.history."""
    cfg, model, a = loaded.cfg, loaded.model, loaded.cfg.analysis
    train = extract_features(model, eval_loader(cfg, loaded.train_set, loaded.device), cfg.train.amp)
    torch.manual_seed(cfg.train.seed)
    heads = new_heads(model, cosine)
    log(f"{result.method}: {'cosine' if cosine else 'linear'} classifiers of {model.num_experts} expert(s) re-trained on frozen "
        f"features of {len(train.labels)} images, {a.two_stage_sampler} sampling, {a.two_stage_epochs} epochs")
    train = FeatureSet(train.features.to(loaded.device), train.labels.to(loaded.device))
    result.history = train_heads(heads, train, epochs=a.two_stage_epochs, lr=a.two_stage_lr, batch_size=a.two_stage_batch_size,
                                 weight_decay=a.two_stage_weight_decay, sampler=a.two_stage_sampler, seed=cfg.train.seed, log=log)
    return heads


def _save_rebalanced(loaded: Loaded, heads: list[nn.Module], result: TwoStageResult, source: str | Path, path: Path) -> Path:
    """The network with its new heads as a checkpoint `ride-fast eval` loads (model_args rebuild it)."""
    cosine_heads = all(is_cosine_head(h) for h in heads)
    net, args = with_heads(loaded.model, heads, cosine_heads)
    if not cosine_heads and any(isinstance(h, nn.Linear) and h.bias is None for h in heads):
        net = _linear_with_zero_bias(net)  # create_model's Linear heads carry a bias: store it as zeros
    ckpt_cfg = update(loaded.cfg, model=args)
    return atomic_save({"model": net.state_dict(), "model_args": args, "config": config_to_dict(ckpt_cfg),
                        "class_counts": [int(c) for c in loaded.class_counts], "epoch": int(loaded.ckpt.get("epoch", 0)),
                        "two_stage": {"method": result.method, "tau": result.tau, "source_checkpoint": str(source)}},
                       path)


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


__all__ = ["METHODS", "TwoStageResult", "plot_two_stage", "run_two_stage", "with_heads"]
