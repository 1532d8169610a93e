"""`ride-fast`: one entry point for the demo, training, evaluation, conversion and cost counting.

    ride-fast demo --out-dir DIR                         MNIST-LT: CE baseline vs RIDE, on the CPU
    ride-fast train --config X [section.key=value ...]   stage 1 (add --resume PATH|auto to continue;
                                                         torchrun --nproc_per_node=N -m ride_fast train ...)
    ride-fast route --checkpoint P [--config X] [...]   stage 2: train the router of a stage-1 checkpoint
    ride-fast eval --checkpoint P [section.key=value]    accuracy overall / many / medium / few (a routed
                                                         checkpoint: routed vs all experts, usage, MACs, time;
                                                         --sweep: accuracy and MACs at every threshold)
    ride-fast show-config --config X [overrides]         the resolved config
    ride-fast flops --config X [overrides]               parameters and MACs per part
    ride-fast data check --config X [overrides]          validate a data set: bad files / lines, class sizes
    ride-fast convert SRC DST --model NAME               original RIDE weights -> ride_fast (classes, experts from SRC)
    ride-fast analyze bias-variance --config X --runs N [--methods ce,ldam,ride]   bias / variance over LT draws
    ride-fast analyze confusion --checkpoint P [...]     hardest-negative score histograms per split
    ride-fast analyze two-stage --checkpoint P --method crt|tau_norm|cosine   decoupled classifiers
    ride-fast analyze ensemble [--baseline P ...] [--ride P ...] [--routed P ...]   accuracy vs MACs

Every command takes --log-level debug|info|warning|error (-v: debug, -q: warnings and errors only)
and --no-progress (no progress bars; also RIDE_FAST_PROGRESS=0). Bars show only on a terminal.
`train` also writes its messages, with time and level, to <train.out_dir>/train.log.
"""
from __future__ import annotations

import argparse
import os
import sys

from ride_fast.config import ConfigError, dump_config, load_config
from ride_fast.engine.monitor import LEVELS, PROGRESS_ENV, setup_logging
from ride_fast.io import plural


ROUTE_EPILOG = """\
each router epoch prints one value per router, joined by / (router i decides whether an image that
experts 1..i have seen goes on to expert i + 1):
  loss       the router's binary cross-entropy, positives weighted by router.w_on (first: the mean)
  positive   % of images labelled "call the next expert": experts 1..i together get the image wrong
             and adding experts would set it right
  called     % of images the router sends on (sigmoid(r) > router.threshold)
  precision  % of the called images that are positive (NaN: none called)
  recall     % of the positive images that are called (NaN: no positive)
docs/method.md §5 has the labels and the loss.
"""


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML recipe (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. optim.lr=0.05")


def build_parser() -> argparse.ArgumentParser:
    from ride_fast import __version__

    parser = argparse.ArgumentParser(prog="ride-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ride-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a CE baseline and RIDE on MNIST-LT and compare them")
    p.add_argument("--out-dir", default="demo_out", help="results; its run folders are trained anew on every call (default demo_out)")
    p.add_argument("--epochs", type=_whole_number_from(1), default=None,
                   help="stage-1 epochs per model (default 30); the router trains 5 x EPOCHS / 30 epochs (at least 1)")

    p = sub.add_parser("train", help="stage-1 training")
    _add_config_args(p)
    p.add_argument("--resume", help="checkpoint to continue from ('auto': OUT_DIR/last.pt if present)")
    p.add_argument("--overwrite", action="store_true",
                   help="a new run into a train.out_dir that holds another run: delete that run's files first "
                        "(config.yaml, config_resume_*.yaml, metrics.jsonl, train.log, *.pt, tensorboard/, per_class_accuracy.*, and the "
                        "reports written beside its checkpoints: routed_config.yaml, routed_eval.json, routed_usage.png, "
                        "*_test_eval.json, *_test_usage.png, *_test_sweep.*, confusion.*, *_crt.*, *_tau_norm.*, *_cosine.*); "
                        "without it the run stops")

    p = sub.add_parser("route", help="stage 2: train the router of a frozen stage-1 checkpoint",
                       description="Stage 2: train the routers of a frozen stage-1 checkpoint. The architecture, the data and "
                                   "the router section come from the checkpoint; --config and key=value overrides change "
                                   "only the keys they set.",
                       epilog=ROUTE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="stage-1 checkpoint (ride-fast train or convert)")
    p.add_argument("--out", help="routed checkpoint to write (default: <train.out_dir>/routed.pt)")
    p.add_argument("--no-eval", action="store_true", help="skip the routed evaluation on the test set")

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.root=... train.device=cpu")
    p.add_argument("--json", help="also write the result to this file (routed checkpoints: default <stem>_test_eval.json; "
                                  "route's <stem>_eval.json is left as it is)")
    p.add_argument("--sweep", action="store_true",
                   help="routed checkpoints: accuracy and MACs at every threshold (table, <stem>_test_sweep.json and .png)")

    p = sub.add_parser("show-config", help="print the resolved config")
    _add_config_args(p)

    p = sub.add_parser("flops", help="parameters and multiply-accumulates per part of the model")
    _add_config_args(p)

    p = sub.add_parser("data", help="data set tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("check", help="validate a data set before a long run; print class sizes, splits, imbalance")
    _add_config_args(q)
    q.add_argument("--images", choices=["none", "header", "decode"], default="decode",
                   help="image check: decode every image (default), header: existence, format and truncation only")
    q.add_argument("--threads", type=int, default=16, help="threads reading the images")

    _add_analyze_parser(sub)
    _add_output_flags(parser)

    from ride_fast.models import list_models

    p = sub.add_parser("convert", help="convert a checkpoint of the original RIDE code",
                       description="Classes, experts, expert width and classifier type are read from SRC; "
                                   "the flags below only check them (a flag that disagrees with the file is an error).")
    p.add_argument("src")
    p.add_argument("dst", help="the converted checkpoint (not SRC; an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    p.add_argument("--model", required=True, choices=list_models(), help="the architecture SRC holds")
    p.add_argument("--num-classes", type=int, help="default: from SRC's classifier")
    p.add_argument("--num-experts", type=int, help="default: from SRC's per-expert stages")
    p.add_argument("--reduce-dimension", action=argparse.BooleanOptionalAction, default=None,
                   help="the experts use the reduced widths (default: from SRC's feature width)")
    p.add_argument("--linear", dest="use_norm", action="store_const", const=False, default=None,
                   help="plain Linear classifiers instead of cosine ones (default: from SRC's classifier)")
    return parser


def _add_output_flags(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """--log-level / -v / -q / --no-progress on the parser and on every subcommand's parser (before or after the command)."""
    g = parser.add_argument_group("output")
    keep = {} if top else {"default": argparse.SUPPRESS}  # a subcommand sets them only when given
    g.add_argument("--log-level", choices=LEVELS, **({"default": "info"} if top else keep),
                   help="messages shown: debug, info (default), warning, error")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug", **keep, help="--log-level debug")
    g.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning", **keep, help="--log-level warning")
    g.add_argument("--no-progress", action="store_true", **keep, help=f"no progress bars (also {PROGRESS_ENV}=0)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_output_flags(sub, top=False)


def _add_analyze_parser(sub) -> None:
    """`ride-fast analyze ...`: the analyses of ride_fast.analysis (each writes a JSON and a PNG)."""
    p = sub.add_parser("analyze", help="bias/variance, hardest-negative confusion, two-stage classifiers, ensembles")
    an = p.add_subparsers(dest="analyze_command", required=True)

    q = an.add_parser("bias-variance", help="train methods on N independent long-tailed draws; 0-1 bias and variance per split")
    _add_config_args(q)
    q.add_argument("--runs", type=int, help="independent long-tailed training sets (default analysis.runs)")
    q.add_argument("--methods", help="comma-separated presets (ce, cb_ce, focal, ldam, ride, rideE) or recipe .yaml files")
    q.add_argument("--workers", type=int, help="parallel training processes (default analysis.workers)")
    q.add_argument("--out-dir", help="run folders and reports (default analysis.out_dir); finished runs are skipped")

    q = an.add_parser("confusion", help="histograms of the largest wrong-class softmax score per split")
    q.add_argument("--checkpoint", action="append", required=True, help="a checkpoint (repeat to compare several)")
    q.add_argument("--name", action="append", help="a label per --checkpoint (default: its folder)")
    q.add_argument("--routed", action="store_true", help="routed checkpoints: use the routed prediction")
    q.add_argument("--bins", type=int, help="histogram bins over [0, 1] (default analysis.confusion_bins)")
    q.add_argument("--out-dir", help="where confusion.json / .png go (default: the first checkpoint's folder)")
    q.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.root=... train.device=cpu")

    q = an.add_parser("two-stage", help="re-balance the classifiers of a trained network: cRT, tau-norm, cosine")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--method", required=True, choices=["crt", "tau_norm", "cosine"])
    q.add_argument("--out-dir", help="where <stem>_<method>.json / .png / .pt go (default: the checkpoint's folder)")
    q.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. analysis.two_stage_epochs=20")

    q = an.add_parser("ensemble", help="accuracy vs MACs: ensembles of 1..K baselines, RIDE with 2..E experts, routed")
    q.add_argument("--baseline", action="append", default=[], help="a baseline checkpoint (repeat: ensemble members in order)")
    q.add_argument("--ride", action="append", default=[], help="a RIDE checkpoint (repeat): all experts and its first k experts")
    q.add_argument("--routed", action="append", default=[], help="a routed RIDE checkpoint (repeat)")
    q.add_argument("--config", help="baseline recipe to train --members copies of (seeds train.seed + i)")
    q.add_argument("--members", type=int, default=0, help="baselines to train from --config (finished ones are skipped)")
    q.add_argument("--ride-config", help="RIDE recipe to train with each --ride-experts count")
    q.add_argument("--ride-experts", type=_csv_of(_whole_number_from(1)), default=[],
                   help="comma-separated expert counts, e.g. 2,3,4")
    q.add_argument("--route", action="store_true", help="also train the routers of the --ride-experts models and add them")
    q.add_argument("--thresholds", type=_csv_of(_number), default=[],
                   help="comma-separated router thresholds (default: each checkpoint's own)")
    q.add_argument("--no-prefixes", action="store_true", help="leave out the first-k-experts points of RIDE networks")
    q.add_argument("--workers", type=int, default=1, help="parallel training processes")
    q.add_argument("--out-dir", default="runs/analysis/ensemble")
    q.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to the recipes and the checkpoints' configs")


def _csv(text: str | None, cast=str) -> list:
    return [cast(v) for v in (text or "").replace(" ", "").split(",") if v]


def _whole_number_from(low: int):
    """An argparse type: a whole number >= `low` (argparse names the flag in its message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _csv_of(parse):
    """An argparse type: a comma-separated list, each item read by `parse` (the message names the item)."""
    def parse_list(text: str) -> list:
        out = []
        for i, item in enumerate(_csv(text)):
            try:
                out.append(parse(item))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"item {i + 1} of {text!r}: {err}") from None
        return out
    return parse_list


def _cmd_analyze(args) -> int:
    from pathlib import Path

    from ride_fast.config import parse_overrides

    cmd = args.analyze_command
    if cmd == "bias-variance":
        from ride_fast.analysis import run_bias_variance

        cfg = load_config(args.config, args.overrides)
        run_bias_variance(cfg, runs=args.runs, methods=_csv(args.methods) or None, workers=args.workers, out_dir=args.out_dir)
    elif cmd == "confusion":
        from ride_fast.analysis import run_confusion

        out_dir = args.out_dir or Path(args.checkpoint[0]).parent
        run_confusion(args.checkpoint, out_dir, overrides=parse_overrides(args.overrides), bins=args.bins, names=args.name,
                      routed=args.routed)
    elif cmd == "two-stage":
        from ride_fast.analysis import run_two_stage

        run_two_stage(args.checkpoint, args.method, out_dir=args.out_dir, overrides=parse_overrides(args.overrides))
    else:
        from ride_fast.analysis import run_ensemble

        run_ensemble(
            args.out_dir, baselines=args.baseline, rides=args.ride, routed=args.routed,
            baseline_cfg=load_config(args.config, args.overrides) if args.config else None, members=args.members,
            ride_cfg=load_config(args.ride_config, args.overrides) if args.ride_config else None,
            ride_experts=args.ride_experts, route=args.route, workers=args.workers,
            overrides=parse_overrides(args.overrides), thresholds=args.thresholds or None,
            prefixes=not args.no_prefixes,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.no_progress:
        os.environ[PROGRESS_ENV] = "0"  # child processes (analysis workers) inherit it
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except (ConfigError, ValueError, TypeError, OSError, RuntimeError, FloatingPointError) as err:
        print(f"ride-fast {args.command}: error: {_error_text(err)}", file=sys.stderr)
        return 2


def _error_text(err: Exception) -> str:
    """The message of `err`; an operating-system error names the path and the reason."""
    if isinstance(err, OSError) and err.filename is not None:
        path = err.filename2 or err.filename
        why = "it is a folder, not a file" if isinstance(err, IsADirectoryError) else err.strerror or str(err)
        return f"cannot open {path}: {why}"
    return str(err)


def _silence_stdout() -> None:
    """After the reader of stdout closed the pipe: send what is left to /dev/null so that the
    interpreter's final flush does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (e.g. captured)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _cmd_demo(args) -> int:
    from ride_fast.demo import DEMO_EPOCHS, run_demo

    run_demo(args.out_dir, epochs=DEMO_EPOCHS if args.epochs is None else args.epochs)
    return 0


def _cmd_train(args) -> int:
    """Stage 1, in one process or as one rank of a torchrun job (see ride_fast.engine.distributed)."""
    from pathlib import Path

    from ride_fast.engine import Trainer
    from ride_fast.engine.distributed import shutdown_distributed

    cfg = load_config(args.config, args.overrides)
    trainer = None
    try:
        trainer = Trainer(cfg, overwrite=args.overwrite)
        resume = args.resume
        if resume == "auto":
            last = Path(cfg.train.out_dir) / "last.pt"
            resume = str(last) if last.exists() else None
            if resume is None:  # a first attempt, or one that died before its first checkpoint
                trainer.restart_unsaved_run()
        if resume:
            trainer.resume(resume)
        trainer.fit()  # its last line names the best epoch and the checkpoints (console and train.log)
    finally:
        try:
            if trainer is not None:
                trainer.close()  # captured graphs first: the process group cannot go while they hold NCCL work
        finally:
            shutdown_distributed()
    return 0


def _cmd_route(args) -> int:
    from ride_fast.config import load_settings
    from ride_fast.engine.checkpoint import load_checkpoint
    from ride_fast.engine.stage2 import route_config, train_router

    # the checkpoint's own config (architecture, data, router section); --config and the overrides only change keys
    cfg = route_config(load_checkpoint(args.checkpoint), args.checkpoint, load_settings(args.config, args.overrides))
    train_router(cfg, args.checkpoint, args.out, evaluate=not args.no_eval)
    return 0


def _cmd_eval(args) -> int:
    from ride_fast.config import parse_overrides
    from ride_fast.engine.checkpoint import is_routed_checkpoint, load_checkpoint
    from ride_fast.engine.evaluate import eval_report
    from ride_fast.engine.routed_eval import evaluate_routed_checkpoint

    overrides = parse_overrides(args.overrides)
    if args.json and os.path.realpath(args.json) == os.path.realpath(args.checkpoint):
        raise ConfigError(f"--json {args.json} is the checkpoint itself; give another file for the report")
    if is_routed_checkpoint(load_checkpoint(args.checkpoint)):  # routed vs all experts, expert usage, MACs and ms per image
        evaluate_routed_checkpoint(args.checkpoint, overrides, args.json, sweep=args.sweep)
        return 0
    if args.sweep:
        raise ConfigError(f"--sweep needs a routed checkpoint (ride-fast route); {args.checkpoint} is a stage-1 checkpoint")
    # The run's own config (one without a data config needs data options), then the overrides
    # (e.g. data.root=... or train.device=cpu); the architecture always comes from the checkpoint.
    eval_report(args.checkpoint, overrides, args.json)
    return 0


def _cmd_show_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_flops(args) -> int:
    from ride_fast.models import create_model
    from ride_fast.profiling import model_cost

    cfg = load_config(args.config, args.overrides)
    num_classes = cfg.model.num_classes or {"mnist_lt": 10, "cifar10_lt": 10, "cifar100_lt": 100, "imagenet_lt": 1000, "inat2018": 8142}.get(cfg.data.name, 0)
    if not num_classes:
        raise ValueError("set model.num_classes to count a model without its data set")
    model = create_model(cfg.model.name, num_classes=num_classes, num_experts=cfg.model.num_experts,
                         reduce_dimension=cfg.model.reduce_dimension, use_norm=cfg.model.use_norm)
    cost = model_cost(model, cfg.data.image_size)
    print(f"{cfg.model.name}, {plural(num_classes, 'class', 'classes')}, {plural(cfg.model.num_experts, 'expert')}, "
          f"{cfg.data.image_size} px, batch 1")
    print(f"{'part':<16}{'params':>14}{'GMACs':>10}")
    print(f"{'trunk':<16}{cost.trunk_params:>14,}{cost.trunk_macs / 1e9:>10.4f}")
    for i, (p, m) in enumerate(zip(cost.expert_params, cost.expert_macs)):
        print(f"{f'expert {i + 1}':<16}{p:>14,}{m / 1e9:>10.4f}")
    router_macs = _print_router_cost(cfg, model, num_classes)
    E = cfg.model.num_experts
    if router_macs is not None:
        print(f"{'totals':<16}{'params':>14}{'GMACs':>10}{'+ routers':>11}   (an image using k experts passes min(k, E-1) routers)")
    for k in range(1, E + 1):
        params = cost.trunk_params + sum(cost.expert_params[:k])
        line = f"{f'total, {k} exp.':<16}{params:>14,}{cost.macs_with(k) / 1e9:>10.4f}"
        if router_macs is not None:
            line += f"{(cost.macs_with(k) + min(k, E - 1) * router_macs) / 1e9:>11.6f}"
        print(line)
    return 0


def _print_router_cost(cfg, model, num_classes: int) -> int | None:
    """Print one router's parameters and MACs (fvcore); None when there is no router to count."""
    if cfg.model.num_experts < 2:
        return None
    if cfg.router.top_k > num_classes:
        print(f"{'router':<16}(not counted: router.top_k={cfg.router.top_k} exceeds the {num_classes} classes; set router.top_k)")
        return None
    from ride_fast.engine.routed_cost import count_router_macs, router_params
    from ride_fast.engine.stage2 import build_router

    router = build_router(cfg.router, model)
    macs = count_router_macs(router)
    one, every = router_params(router)
    print(f"{'router (each)':<16}{one:>14,}{macs / 1e9:>10.4f}   ({macs:,} MACs; {plural(cfg.model.num_experts - 1, 'router')}, "
          f"{every:,} params in all; top-k {cfg.router.top_k})")
    return macs


def _cmd_data(args) -> int:
    """`data check`: every problem with its file and line, then the statistics; exit 1 on problems."""
    from ride_fast.data.check import check_data
    from ride_fast.engine.monitor import progress_bar

    cfg = load_config(args.config, args.overrides)
    current: list = [None]

    def progress(done: int, total: int) -> None:  # images checked so far, per split (train, then test)
        bar = current[0]
        if bar is None or bar.n >= bar.total:  # the first call of a split
            bar = current[0] = progress_bar(total, "checking images", True)
        if bar is not None:
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    report = check_data(cfg.data, level=args.images, threads=args.threads, progress=progress)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_convert(args) -> int:
    from ride_fast.models.convert import convert_original_checkpoint
    from ride_fast.router import Router

    def check_router(state, net):  # router weights must rebuild a router for this network, as `ride-fast eval` will
        Router.from_original(state, net.num_classes, num_experts=net.num_experts, feature_dim=net.feature_dim)

    info = convert_original_checkpoint(
        args.src, args.dst, args.model, num_classes=args.num_classes, num_experts=args.num_experts,
        reduce_dimension=args.reduce_dimension, use_norm=args.use_norm, overwrite=args.overwrite, check_router=check_router,
    )
    print(f"wrote {args.dst}: " + ", ".join(f"{k}={v}" for k, v in info["model_args"].items()))
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "route": _cmd_route,
    "eval": _cmd_eval,
    "show-config": _cmd_show_config,
    "flops": _cmd_flops,
    "data": _cmd_data,
    "convert": _cmd_convert,
    "analyze": _cmd_analyze,
}
