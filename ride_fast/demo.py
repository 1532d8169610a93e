"""The quick-start demo: a cross-entropy baseline against RIDE (3 experts) on MNIST-LT, on the CPU.

MNIST-LT is made of real digits (see ride_fast.data.mnist_lt): 988 training images from 400 down to
4 per class (imbalance 100) and a balanced test set of 1,000. Both models are CIFAR ResNet-32s: the
baseline is the plain network (16/32/64 channels, linear classifier, cross-entropy), RIDE has three
reduced experts with cosine classifiers and the RIDE loss. The schedule is the CIFAR recipe shrunk
from 200 to `epochs` epochs (warm-up, DRW switch and lr steps at the same fractions of the run).

The recipes live here, in `demo_recipes`, because they follow `epochs` (the router's epochs too:
5 x epochs / 30, at least 1, `router_epochs`); configs/mnist_lt_ce.yaml and
configs/mnist_lt_ride3.yaml are the same recipes at DEMO_EPOCHS for `ride-fast train` (a test keeps
them equal).

Stage 2 then trains RIDE's router on the frozen network with the published recipe (class-balanced
draws, weighted BCE with w_on = 100, SGD with Nesterov momentum and cosine decay, 5 epochs;
docs/method.md §5) and top-k = 10, all the classes MNIST-LT has (the CIFAR recipe's 30 needs 30
classes), with four changes of scale, all set by the router section of the RIDE recipe:

- labels from held-out digits (router.router_data=heldout): MNIST-LT uses only part of the 5,000
  digits (3,012 are left over, none of the head class), and the experts memorise their 988 training
  images, so on the training set the last router almost never gets a positive label and the last
  expert is almost never called. The routers train on up to 100 unused digits per class instead;
- batches of 128 instead of 512 (7 steps an epoch instead of 2; CIFAR-100-LT has 21);
- lr 0.1 instead of 0.01: 5 epochs of 7 steps are 35 steps (CIFAR-100-LT: 105), too few at 0.01 for
  the routers to move from their initial weights (they only shift their bias, and every image gets
  about the same probability). With the router's inputs at unit scale (docs/method.md §5), 0.1 is
  still inside the stable range of SGD on this loss;
- the threshold chosen from the accuracy-cost curve of up to 300 other unused digits per class
  (router.calibrate_threshold; 2,112 digits): the cheapest threshold whose accuracy drop against
  all experts, plus 3 standard errors, is within 1 point (docs/method.md §5; the published
  threshold is 0.5). 3 rather than 1.645: the goal is met on the 1,000 test digits, whose drop has
  its own noise (`DEMO_CALIBRATION_Z`). Fewer calibration digits give a wider margin and a dearer
  threshold.

The table gains a "routed" row: accuracy of the routed model and its mean MACs per image (trunk +
the experts each image used + the routers it went through; docs/method.md §6); `routed_eval.json`
and `expert_usage.png` hold the share of images using 1, 2 or 3 experts per split, the measured time
(throughput and batch-1 latency, docs/method.md §6), the held-out counts and the calibration curve. The README shows the table of a full run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ride_fast.config import Config, config_from_dict
from ride_fast.data import build_datasets, split_of_classes
from ride_fast.engine.monitor import info
from ride_fast.io import json_text, plural, pyplot, save_figure

DEMO_EPOCHS = 30
DEMO_ROUTER_EPOCHS = 5  # the published stage-2 length, at DEMO_EPOCHS; `epochs` scales it (`router_epochs`)
DEMO_ROUTER_BATCH = 128  # the published 512 would leave 2 steps an epoch at this scale (CIFAR-100-LT: 21)
DEMO_ROUTER_LR = 0.1  # the published 0.01 is too slow for 35 steps (CIFAR-100-LT: 105)
DEMO_HELDOUT_PER_CLASS = 100  # held-out digits per class that train the routers
DEMO_CALIBRATION_PER_CLASS = 300  # other held-out digits per class that set the threshold (at most; 2,112 in all)
DEMO_MAX_DROP = 1.0  # points of held-out accuracy the routed model may lose against all experts (with DEMO_CALIBRATION_Z SE of margin)
# The margin covers the test set's noise too: a test drop scatters around the calibration's by
# sqrt(SE_cal^2 + SE_test^2), and SE_test ~ SE_cal sqrt(2,112 / 1,000) here, so a one-sided 95 % bound
# needs 1.645 x sqrt(1 + 2.112) = 2.9 calibration SEs (docs/method.md §5). With 1.645 the test drop of
# some stage-1 trainings went over 1 point while the calibration drop stayed near 0.5.
DEMO_CALIBRATION_Z = 3.0
ROUTED_ROW = "RIDE 3 experts, routed"  # routers on held-out digits, threshold calibrated (the RIDE recipe's router section)


def router_epochs(epochs: int) -> int:
    """Stage-2 epochs of a demo with `epochs` stage-1 epochs: DEMO_ROUTER_EPOCHS x epochs / DEMO_EPOCHS,
    rounded, at least 1 (5 at 30, 1 at 1..8)."""
    return max(1, round(DEMO_ROUTER_EPOCHS * epochs / DEMO_EPOCHS))


def demo_recipes(epochs: int = DEMO_EPOCHS, out_dir: str = "demo_out") -> dict[str, Config]:
    """The two configurations the demo trains (the CIFAR-100-LT recipe at MNIST-LT scale)."""
    reweight = int(round(epochs * 0.8))  # 160 of 200 in the CIFAR recipe
    milestones = [reweight, int(round(epochs * 0.9))]  # 160 and 180 of 200
    common = {
        "data": {"name": "mnist_lt", "imbalance_factor": 100.0, "batch_size": 128},
        "optim": {"lr": 0.1, "warmup_epochs": max(1, round(epochs * 5 / 200)) if epochs >= 10 else 0, "milestones": milestones},
        "train": {"epochs": epochs, "progress": False, "keep_last": 1, "eval_every": 5},
    }
    baseline = {
        **common,
        "model": {"name": "resnet32", "num_experts": 1, "reduce_dimension": False, "use_norm": False},
        "loss": {"name": "ce"},
        "train": {**common["train"], "out_dir": f"{out_dir}/baseline_ce"},
    }
    ride = {
        **common,
        "model": {"name": "resnet32", "num_experts": 3, "reduce_dimension": True, "use_norm": True},
        "router": {"top_k": 10, "epochs": router_epochs(epochs), "batch_size": DEMO_ROUTER_BATCH, "lr": DEMO_ROUTER_LR,  # 10 classes
                   "router_data": "heldout", "heldout_per_class": DEMO_HELDOUT_PER_CLASS, "calibrate_threshold": True,
                   "max_accuracy_drop": DEMO_MAX_DROP, "calibration_per_class": DEMO_CALIBRATION_PER_CLASS,
                   "calibration_z": DEMO_CALIBRATION_Z},
        "loss": {"name": "ride", "reweight_epoch": reweight, "diversity_factor": -0.45, "reweight_factor": 0.05},
        "train": {**common["train"], "out_dir": f"{out_dir}/ride_3experts"},
    }
    return {"CE baseline (R32)": config_from_dict(baseline), "RIDE 3 experts (R32)": config_from_dict(ride)}


def run_demo(out_dir: str | Path = "demo_out", epochs: int = DEMO_EPOCHS, log: Callable[[str], None] = info) -> dict:
    """Train both models, print the comparison table, write results.json and per_class_accuracy.png."""
    from ride_fast.engine import Trainer
    from ride_fast.profiling import model_cost

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes = demo_recipes(epochs, str(out_dir))
    train_set, test_set = build_datasets(next(iter(recipes.values())).data)
    counts = train_set.class_counts()
    log(f"MNIST-LT: {len(train_set)} training images, per class {counts.tolist()} (imbalance {counts.max() / counts.min():.0f}); "
        f"{len(test_set)} balanced test images")
    results: dict = {"data": {"train_class_counts": counts.tolist(), "test_size": len(test_set),
                              "splits": {k: v.nonzero()[0].tolist() for k, v in split_of_classes(counts).items()}},
                     "models": {}}
    for name, cfg in recipes.items():
        log(f"\n== {name}: {plural(cfg.model.num_experts, 'expert')}, loss {cfg.loss.name}, {plural(cfg.train.epochs, 'epoch')}")
        start = time.perf_counter()
        trainer = Trainer(cfg, train_set=train_set, test_set=test_set, log=lambda s: log("  " + s) if _every(s, cfg) else None,
                          overwrite=True)  # the demo trains both models anew on every call, replacing its last results
        summary = trainer.fit()
        seconds = time.perf_counter() - start
        acc = trainer.evaluate()  # the last epoch, like ImageNet-LT / iNat reporting
        cost = model_cost(trainer.model, cfg.data.image_size)
        results["models"][name] = {
            **acc.as_dict(with_per_class=True),
            "mmacs_per_image": cost.total_macs / 1e6,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "num_experts": cfg.model.num_experts,
            "train_seconds": seconds,
            "best_epoch": summary["best_epoch"],
            "checkpoint": str(Path(cfg.train.out_dir) / "last.pt"),
        }
        if cfg.model.num_experts > 1:
            results["models"][ROUTED_ROW] = run_stage2(trainer, out_dir, log)
    table = format_table(results["models"])
    log("\n" + table)
    results["table"] = table
    (out_dir / "results.json").write_text(json_text(results, indent=2))
    plot_per_class(results, out_dir / "per_class_accuracy.png")
    extra = f", {out_dir / 'routed_eval.json'} and {out_dir / 'expert_usage.png'}" if ROUTED_ROW in results["models"] else ""
    log(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'per_class_accuracy.png'}{extra}")
    return results


def run_stage2(trainer, out_dir: Path, log: Callable[[str], None] = info) -> dict:
    """Train the router of the trainer's (stage-1) RIDE model as its config's router section says,
    evaluate routed against all experts, write routed.pt, routed_eval.json and expert_usage.png;
    returns the demo table's row."""
    from ride_fast.engine.routed_eval import evaluate_routed, write_report
    from ride_fast.engine.stage2 import fit_stage2

    cfg = trainer.cfg
    log(f"\n== stage 2: router on the frozen RIDE model, {plural(cfg.router.epochs, 'epoch')}, batch {cfg.router.batch_size}, "
        f"top-k {cfg.router.top_k}")
    start = time.perf_counter()
    stage2 = fit_stage2(cfg, trainer.model, trainer.train_set, trainer.test_set, log=lambda s: log("  " + s),
                        stage1_checkpoint=str(Path(cfg.train.out_dir) / "last.pt"))
    train_seconds = stage2.seconds
    checkpoint = stage2.save(Path(cfg.train.out_dir) / "routed.pt")
    report = evaluate_routed(trainer.model, stage2.router, trainer.test_loader, trainer.class_counts,
                             image_size=cfg.data.image_size, threshold=stage2.threshold, amp=cfg.train.amp, cost=stage2.cost,
                             show_progress=cfg.train.progress)
    write_report(report, out_dir / "routed_eval.json", out_dir / "expert_usage.png",
                 extra={"checkpoint": str(checkpoint), "stage2": stage2.info})
    seconds = time.perf_counter() - start
    log("  " + report.summary().replace("\n", "\n  "))
    log(f"  stage 2: {train_seconds:.1f} s training and calibration, {seconds:.1f} s with evaluation and cost counting")
    params = sum(p.numel() for p in trainer.model.parameters()) + sum(p.numel() for p in stage2.router.parameters())
    return {
        **report.routed.as_dict(with_per_class=True),
        "threshold": report.threshold,
        "stage2": stage2.info,
        "mmacs_per_image": report.mean_macs / 1e6,
        "params": params,
        "num_experts": trainer.model.num_experts,
        "mean_experts_per_image": report.mean_experts,
        "expert_usage": report.usage,
        "all_experts_overall": report.all_experts.overall,
        "macs_ratio_to_baseline": report.macs_ratio_to_baseline,
        "ms_per_image": report.ms_per_image,
        "train_seconds": train_seconds,
        "stage2_seconds": seconds,
        "checkpoint": str(checkpoint),
    }


def _every(line: str, cfg: Config) -> bool:
    """Print every 5th epoch line and the last one (the demo is meant to be read); the trainer's
    start-up summary is left out (the demo prints its own header per model)."""
    if line.startswith("train: "):
        return False
    try:
        epoch = int(line.split()[1])
    except (IndexError, ValueError):
        return True
    return epoch % 5 == 0 or epoch == cfg.train.epochs


def format_table(models: dict) -> str:
    head = f"{'model':<24}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}{'MMACs/img':>11}{'params':>10}"
    lines = [head, "-" * len(head)]
    for name, r in models.items():
        lines.append(
            f"{name:<24}{r['overall']:>9.1f}{r['many']:>8.1f}{r['medium']:>8.1f}{r['few']:>8.1f}"
            f"{r['mmacs_per_image']:>11.1f}{r['params'] / 1e6:>9.3f}M"
        )
    return "\n".join(lines)


def plot_per_class(results: dict, path: Path) -> None:
    """Per-class test accuracy against the number of training images of the class (log scale)."""
    plt = pyplot()
    counts = results["data"]["train_class_counts"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (name, r), marker in zip(results["models"].items(), "os^v"):
        ax.plot(counts, r["per_class"], marker=marker, linestyle="-", label=f"{name}: few {r['few']:.1f}%")
    for x in (20, 100):
        ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title("MNIST-LT (imbalance 100): per-class accuracy")
    for label, x in (("few", 10.0 ** 0.65), ("medium", 45.0), ("many", 200.0)):  # centred in each split's band
        ax.text(x, 45, label, ha="center", fontsize=9, color="grey")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
