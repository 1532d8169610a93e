"""`ride-fast`: one entry point for the demo, training, evaluation, conversion and cost counting.

    ride-fast demo --out-dir DIR                         MNIST-LT: CE baseline vs RIDE, on the CPU
    ride-fast train --config X [section.key=value ...]   stage 1 (add --resume PATH to continue)
    ride-fast eval --checkpoint P [section.key=value]    accuracy overall / many / medium / few
    ride-fast show-config --config X [overrides]         the resolved config
    ride-fast flops --config X [overrides]               parameters and MACs per part
    ride-fast convert SRC DST --model NAME ...           original RIDE weights -> ride_fast
"""
from __future__ import annotations

import argparse
import json
import sys

from ride_fast.config import ConfigError, config_from_dict, dump_config, load_config, update


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML recipe (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. optim.lr=0.05")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ride-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a CE baseline and RIDE on MNIST-LT and compare them")
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 30)")

    p = sub.add_parser("train", help="stage-1 training")
    _add_config_args(p)
    p.add_argument("--resume", help="checkpoint to continue from ('auto': OUT_DIR/last.pt if present)")

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.root=... train.device=cpu")
    p.add_argument("--json", help="also write the result to this file")

    p = sub.add_parser("show-config", help="print the resolved config")
    _add_config_args(p)

    p = sub.add_parser("flops", help="parameters and multiply-accumulates per part of the model")
    _add_config_args(p)

    p = sub.add_parser("convert", help="convert a checkpoint of the original RIDE code")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", required=True, help="resnet32 | resnet10 | resnet50 | resnext50_32x4d")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--no-reduce-dimension", action="store_true", help="the experts use the full widths")
    p.add_argument("--linear", action="store_true", help="plain Linear classifiers instead of cosine ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"ride-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


def _cmd_demo(args) -> int:
    from ride_fast.demo import DEMO_EPOCHS, run_demo

    run_demo(args.out_dir, epochs=args.epochs or DEMO_EPOCHS)
    return 0


def _cmd_train(args) -> int:
    from pathlib import Path

    from ride_fast.engine import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    resume = args.resume
    if resume == "auto":
        last = Path(cfg.train.out_dir) / "last.pt"
        resume = str(last) if last.exists() else None
    if resume:
        trainer.resume(resume)
    summary = trainer.fit()
    print(f"best epoch {summary['best_epoch']}: {summary['best_metric']:.2f}; checkpoints in {cfg.train.out_dir}")
    return 0


def _cmd_eval(args) -> int:
    from ride_fast.config import parse_overrides
    from ride_fast.engine import Trainer, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    # The run's own config (a converted original checkpoint has none: defaults), then the overrides
    # (e.g. data.root=... or train.device=cpu); the architecture always comes from the checkpoint.
    cfg = update(config_from_dict(ckpt.get("config")), **parse_overrides(args.overrides))
    cfg = update(cfg, model=dict(ckpt["model_args"]), train={"epochs": 0})
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.model.load_state_dict(ckpt["model"])
    acc = trainer.evaluate()
    print(f"{args.checkpoint}: overall {acc.overall:.2f}  many {acc.many:.2f}  medium {acc.medium:.2f}  few {acc.few:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(acc.as_dict(with_per_class=True), fh, indent=2)
    return 0


def _cmd_show_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_flops(args) -> int:
    from ride_fast.models import create_model
    from ride_fast.profiling import model_cost

    cfg = load_config(args.config, args.overrides)
    num_classes = cfg.model.num_classes or {"mnist_lt": 10, "cifar10_lt": 10, "cifar100_lt": 100}.get(cfg.data.name, 0)
    if not num_classes:
        raise ValueError("set model.num_classes to count a model without its data set")
    model = create_model(cfg.model.name, num_classes=num_classes, num_experts=cfg.model.num_experts,
                         reduce_dimension=cfg.model.reduce_dimension, use_norm=cfg.model.use_norm)
    cost = model_cost(model, cfg.data.image_size)
    print(f"{cfg.model.name}, {num_classes} classes, {cfg.model.num_experts} experts, {cfg.data.image_size} px, batch 1")
    print(f"{'part':<16}{'params':>14}{'GMACs':>10}")
    print(f"{'trunk':<16}{cost.trunk_params:>14,}{cost.trunk_macs / 1e9:>10.4f}")
    for i, (p, m) in enumerate(zip(cost.expert_params, cost.expert_macs)):
        print(f"{f'expert {i + 1}':<16}{p:>14,}{m / 1e9:>10.4f}")
    for k in range(1, cfg.model.num_experts + 1):
        params = cost.trunk_params + sum(cost.expert_params[:k])
        print(f"{f'total, {k} exp.':<16}{params:>14,}{cost.macs_with(k) / 1e9:>10.4f}")
    return 0


def _cmd_convert(args) -> int:
    from ride_fast.models.convert import convert_original_checkpoint

    convert_original_checkpoint(
        args.src, args.dst, args.model, num_classes=args.num_classes, num_experts=args.num_experts,
        reduce_dimension=not args.no_reduce_dimension, use_norm=not args.linear,
    )
    print(f"wrote {args.dst}")
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "show-config": _cmd_show_config,
    "flops": _cmd_flops,
    "convert": _cmd_convert,
}
