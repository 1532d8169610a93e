"""Does the routed demo pay on every seed? A script, run explicitly (minutes per stage-1 seed on a CPU):

    python benchmarks/demo_seeds.py --out-dir runs/demo_seeds [--stage1-seeds 0 1] [--stage2-seeds 0 1 2 3 4]

For each stage-1 seed, the demo's RIDE recipe (ride_fast.demo.demo_recipes, train.seed = that seed)
is trained once (reused when <out-dir>/stage1_seed<s>/last.pt exists), then stage 2 runs as the
demo runs it (routers on held-out digits, threshold from the calibration curve) and the routed model
is evaluated on the test set. Stage 2 runs with every --stage2-seeds value on the first stage-1
model (the seed draws the held-out split, the router's initial weights and the class-balanced
draws), and with the stage-1 seed itself on the others, as the demo does. Each run records the
chosen threshold, the routed / all-experts MACs ratio, the test accuracy drop and the experts used
per split; the bar is a ratio <= MACS_BAR and a drop <= DROP_BAR points. Rows go to
<out-dir>/demo_seeds.json (merged with the rows already there) and benchmarks/results/demo_seeds.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

MACS_BAR = 0.80  # routed MACs per image / all experts'
DROP_BAR = 1.0  # points of test accuracy below all experts


def stage1(cfg, seed: int, out_dir: Path, train_set, test_set, log):
    from ride_fast.engine import Trainer
    from ride_fast.engine.checkpoint import load_checkpoint, network_from_checkpoint

    path = out_dir / f"stage1_seed{seed}" / "last.pt"
    if path.is_file():
        log(f"stage 1, seed {seed}: reusing {path}")
        return network_from_checkpoint(load_checkpoint(path), path).eval(), str(path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, out_dir=str(path.parent)))
    trainer = Trainer(cfg, train_set=train_set, test_set=test_set, log=lambda s: None)
    start = time.perf_counter()
    trainer.fit()
    log(f"stage 1, seed {seed}: {time.perf_counter() - start:.0f} s")
    return trainer.model.eval(), str(path)


def stage2_row(cfg, net, stage1_seed: int, stage2_seed: int, train_set, test_set, log) -> dict:
    from ride_fast.data import InMemoryLoader
    from ride_fast.engine.routed_eval import evaluate_routed
    from ride_fast.engine.stage2 import fit_stage2

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=stage2_seed))
    start = time.perf_counter()
    result = fit_stage2(cfg, net, train_set, test_set, log=lambda s: None)
    loader = InMemoryLoader(test_set, cfg.data.eval_batch_size, train=False)
    report = evaluate_routed(net, result.router, loader, train_set.class_counts(), image_size=cfg.data.image_size,
                             threshold=result.threshold, amp=cfg.train.amp, cost=result.cost, timing=False)
    cal = result.calibration
    row = {
        "stage1_seed": stage1_seed, "stage2_seed": stage2_seed, "amp": cfg.train.amp, "threshold": result.threshold,
        "macs_ratio": report.macs_ratio, "test_drop": report.all_experts.overall - report.routed.overall,
        "all_experts": report.all_experts.overall, "routed": report.routed.overall,
        "mean_experts": report.mean_experts, "calibration_drop": cal.drop, "calibration_drop_se": cal.drop_se,
        "router_loss": [h.loss for h in result.trainer.history], "seconds": time.perf_counter() - start,
    }
    row["pays"] = row["macs_ratio"] <= MACS_BAR and row["test_drop"] <= DROP_BAR
    log(f"stage 1 seed {stage1_seed}, stage 2 seed {stage2_seed} (amp {cfg.train.amp}): threshold {row['threshold']:.4g}  MACs x{row['macs_ratio']:.3f}  "
        f"test {row['routed']:.1f} vs {row['all_experts']:.1f} (drop {row['test_drop']:+.1f})  "
        f"experts many/medium/few {report.mean_experts['many']:.2f}/{report.mean_experts['medium']:.2f}/{report.mean_experts['few']:.2f}"
        f"  {'pays' if row['pays'] else 'DOES NOT PAY'}")
    return row


def main(argv=None) -> int:
    from ride_fast.data import build_datasets
    from ride_fast.demo import demo_recipes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/demo_seeds")
    p.add_argument("--stage1-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--stage2-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--amp", default=None, help="train.amp for stage 2 and the evaluation (none: fp32, as on a CPU without AMX)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = demo_recipes()["RIDE 3 experts (R32)"]
    if args.amp:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=args.amp))
    train_set, test_set = build_datasets(cfg.data)
    rows = []
    for i, s1 in enumerate(args.stage1_seeds):
        net, _ = stage1(cfg, s1, out_dir, train_set, test_set, print)
        for s2 in (args.stage2_seeds if i == 0 else [s1]):
            rows.append(stage2_row(cfg, net, s1, s2, train_set, test_set, print))
    old = out_dir / "demo_seeds.json"  # rows of earlier runs into the same folder stay, unless run again
    if old.is_file():
        key = lambda r: (r["stage1_seed"], r["stage2_seed"], r.get("amp", "auto"))  # noqa: E731
        done = {key(r) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if key(r) not in done] + rows
        rows.sort(key=key)
    text = json.dumps({"bar": {"macs_ratio": MACS_BAR, "test_drop": DROP_BAR}, "rows": rows}, indent=2)
    (out_dir / "demo_seeds.json").write_text(text)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "demo_seeds.json").write_text(text)
    paid = sum(r["pays"] for r in rows)
    print(f"{paid} of {len(rows)} runs pay (MACs ratio <= {MACS_BAR}, test drop <= {DROP_BAR} points)")
    return 0 if paid == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
