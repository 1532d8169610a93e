"""Accuracy against cost: ensembles of independent baselines vs RIDE experts, routed and not (Fig. 7).

Shape legend: K baseline members, E experts of a RIDE network, N test images, C classes.

    member logits   [K, N, C]  one independently trained baseline each (its mean expert logits)
    ensemble of k   mean over members 1..k of their logits          cost: sum of their MACs
    RIDE, all       mean over the E experts' logits                  cost: trunk + E experts
    RIDE, first k   mean over experts 1..k (one forward, k = 1..E)   cost: trunk + experts 1..k
    RIDE, routed    routed inference (ride_fast.engine.routed_eval) cost: test-set mean of trunk +
                                                                     used experts + routers passed

MACs per image at batch 1, counted with fvcore part by part (ride_fast.profiling). Every point
carries the accuracy overall and per many / medium / few split (percent).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ride_fast.analysis.common import (
    collect_outputs,
    eval_loader,
    input_size,
    load_analysis_checkpoint,
    split_summary,
    write_json,
)
from ride_fast.analysis.runs import RunSpec, train_runs
from ride_fast.config import Config, update
from ride_fast.engine import SplitAccuracy, load_checkpoint
from ride_fast.engine.metrics import pct
from ride_fast.engine.monitor import info
from ride_fast.io import plural, pyplot, save_figure
from ride_fast.profiling import model_cost

FAMILIES = ("baseline ensemble", "RIDE, first k experts", "RIDE, all experts", "RIDE, routed")


@dataclass
class EnsemblePoint:
    """One model or ensemble: its cost and accuracy."""

    family: str  # one of FAMILIES
    label: str
    size: float  # members (ensembles), experts used (RIDE; routed: mean experts per image)
    macs: float  # mean MACs per test image
    accuracy: SplitAccuracy
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"family": self.family, "label": self.label, "size": self.size, "macs_per_image": self.macs,
                "mmacs_per_image": self.macs / 1e6, "accuracy": self.accuracy.as_dict(), **self.detail}


@dataclass
class EnsembleReport:
    points: list[EnsemblePoint]
    data: dict
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"points": [p.as_dict() for p in self.points], "data": self.data, "notes": self.notes, "seconds": self.seconds}

    def summary(self) -> str:
        head = f"{'family':<24}{'model':<30}{'MMACs/img':>11}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}"
        lines = [head, "-" * len(head)]
        for p in self.points:
            a = p.accuracy
            lines.append(f"{p.family:<24}{p.label:<30}{p.macs / 1e6:>11.2f}{a.overall:>9.2f}{pct(a.many, '>8.2f')}{pct(a.medium, '>8.2f')}{pct(a.few, '>8.2f')}")
        return "\n".join(lines + self.notes)


class _Costs:
    """model_cost per architecture, counted once."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._cache: dict = {}

    def __call__(self, model):
        key = tuple(sorted(model.model_args.items()))
        if key not in self._cache:
            self._cache[key] = model_cost(model, self.image_size)
        return self._cache[key]


def ensemble_report(
    baselines=(),
    rides=(),
    routed=(),
    *,
    overrides: dict | None = None,
    thresholds=None,
    prefixes: bool = True,
    datasets=None,
    log: Callable[[str], None] = info,
) -> EnsembleReport:
    """Points for ensembles of the first 1..K `baselines`, every RIDE checkpoint in `rides` (all
    experts, and its first k experts when `prefixes`), and every routed checkpoint in `routed` (at
    its own router.threshold, or at each of `thresholds`). The data come from the first checkpoint's
    config (with `overrides`); `datasets` = (train, test) replaces building them."""
    baselines, rides, routed = [str(p) for p in baselines], [str(p) for p in rides], [str(p) for p in routed]
    paths = baselines + rides + routed
    if not paths:
        raise ValueError("nothing to compare: pass baseline checkpoints (--baseline), RIDE ones (--ride) or routed ones (--routed)")
    start = time.perf_counter()
    first = load_analysis_checkpoint(paths[0], overrides, datasets=datasets, command="analyze ensemble")
    datasets = (first.train_set, first.test_set)
    cfg0 = first.cfg
    counts = first.class_counts
    C = first.model.num_classes
    size = input_size(cfg0, first.test_set)
    costs = _Costs(size)
    points: list[EnsemblePoint] = []
    notes: list[str] = []

    def outputs(path):
        if path == paths[0]:
            loaded = first
        else:
            loaded = load_analysis_checkpoint(path, overrides, datasets=datasets, command="analyze ensemble")
        out = collect_outputs(loaded.model, eval_loader(loaded.cfg, loaded.test_set, loaded.device), amp=loaded.cfg.train.amp)
        return loaded, out

    if baselines:
        summed, macs = None, 0.0
        for k, path in enumerate(baselines, 1):
            loaded, out = outputs(path)
            if loaded.model.num_experts != 1:
                notes.append(f"note: baseline {path} has {loaded.model.num_experts} experts (its mean logits are one member)")
            summed = out.logits.clone() if summed is None else summed + out.logits
            macs += costs(loaded.model).total_macs
            acc = split_summary((summed / k).argmax(1), out.labels, counts, C)
            points.append(EnsemblePoint(FAMILIES[0], plural(k, "baseline"), k, macs, acc, {"members": baselines[:k]}))
            log(f"ensemble of {k}: {acc.overall:.2f} % at {macs / 1e6:.2f} MMACs")
    for path in rides:
        loaded, out = outputs(path)
        E = loaded.model.num_experts
        cost = costs(loaded.model)
        ks = range(1, E + 1) if prefixes else [E]
        for k in ks:
            acc = split_summary(out.expert_logits[:k].mean(0).argmax(1), out.labels, counts, C)
            family = FAMILIES[2] if k == E else FAMILIES[1]
            points.append(EnsemblePoint(family, f"RIDE-{E}, {plural(k, 'expert')}", k, cost.macs_with(k), acc,
                                        {"checkpoint": path, "experts_in_network": E}))
        log(f"RIDE {E} experts ({path}): {points[-1].accuracy.overall:.2f} % at {cost.total_macs / 1e6:.2f} MMACs")
    for path in routed:
        points.extend(_routed_points(path, overrides, datasets, counts, thresholds, log))
    return EnsembleReport(points, {"name": cfg0.data.name, "test_size": len(first.test_set), "train_class_counts": counts.tolist(),
                                   "image_size": size}, time.perf_counter() - start, notes)


def _routed_points(path, overrides, datasets, counts, thresholds, log) -> list[EnsemblePoint]:
    from ride_fast.engine.checkpoint import is_routed_checkpoint, router_from_checkpoint
    from ride_fast.engine.routed_cost import baseline_macs, routed_cost
    from ride_fast.engine.routed_eval import evaluate_routed

    loaded = load_analysis_checkpoint(path, overrides, datasets=datasets, command="analyze ensemble")
    if not is_routed_checkpoint(loaded.ckpt):
        raise ValueError(f"{path} is not a routed checkpoint (train its router with `ride-fast route`, or pass it with --ride)")
    router = router_from_checkpoint(loaded.ckpt, loaded.model.num_classes).to(loaded.device).eval()
    size = input_size(loaded.cfg, loaded.test_set)
    cost = routed_cost(loaded.model, router, size)
    base = baseline_macs(loaded.model.model_args, size)
    points = []
    for t in thresholds or [loaded.cfg.router.threshold]:
        report = evaluate_routed(loaded.model, router, eval_loader(loaded.cfg, loaded.test_set, loaded.device), counts,
                                 image_size=size, threshold=float(t), amp=loaded.cfg.train.amp, cost=cost, baseline=base,
                                 timing=False)
        E = loaded.model.num_experts
        points.append(EnsemblePoint(FAMILIES[3], f"RIDE-{E}, routed (t={float(t):g})", report.mean_experts["overall"], report.mean_macs,
                                    report.routed, {"checkpoint": str(path), "threshold": float(t), "experts_in_network": E,
                                                    "expert_usage": report.usage, "macs_without_routers": report.mean_macs_network}))
        log(f"RIDE {E} experts routed, threshold {float(t):g}: {report.routed.overall:.2f} % at {report.mean_macs / 1e6:.2f} MMACs "
            f"({report.mean_experts['overall']:.2f} experts per image)")
    return points


# ---------------------------------------------------------------------------------------------
# training what is missing


def member_specs(cfg: Config, members: int, out_dir: str | Path, datasets=None) -> list[RunSpec]:
    """K independently trained copies of `cfg` (seeds train.seed + i) in OUT/baseline/member_III
    (on `datasets` = (train, test) when given, else on cfg.data)."""
    if members < 1:
        raise ValueError(f"--members must be >= 1, got {members}")
    train, test = datasets or (None, None)
    return [RunSpec(f"baseline member {i}", update(cfg, train={"out_dir": str(Path(out_dir) / "baseline" / f"member_{i:03d}"),
                                                               "seed": cfg.train.seed + i}), train, test)
            for i in range(members)]


def ride_run_specs(cfg: Config, experts, out_dir: str | Path, datasets=None) -> list[RunSpec]:
    """One RIDE run of `cfg` per number of experts, in OUT/ride_E."""
    train, test = datasets or (None, None)
    return [RunSpec(f"RIDE {e} experts", update(cfg, model={"num_experts": int(e)}, train={"out_dir": str(Path(out_dir) / f"ride_{int(e)}")}),
                    train, test)
            for e in experts]


def route_runs(specs: list[RunSpec], log: Callable[[str], None] = info) -> list[Path]:
    """Train the router of every finished RIDE run that has none yet (OUT/ride_E/routed.pt)."""
    from ride_fast.engine.stage2 import train_router

    out = []
    for spec in specs:
        path = spec.out_dir / "routed.pt"
        if path.is_file():
            load_checkpoint(path)  # a clear error if it is unreadable
            log(f"{spec.name}: router done already ({path})")
        else:
            train_router(spec.cfg, spec.final_checkpoint, path, log=lambda s, n=spec.name: log(f"{n}: {s}"), evaluate=False)
        out.append(path)
    return out


def run_ensemble(
    out_dir: str | Path,
    *,
    baselines=(),
    rides=(),
    routed=(),
    baseline_cfg: Config | None = None,
    members: int = 0,
    ride_cfg: Config | None = None,
    ride_experts=(),
    route: bool = False,
    workers: int = 1,
    overrides: dict | None = None,
    thresholds=None,
    prefixes: bool = True,
    datasets=None,
    log: Callable[[str], None] = info,
) -> EnsembleReport:
    """Train the missing models (`members` baselines of `baseline_cfg`, RIDE of `ride_cfg` with each
    of `ride_experts`, their routers when `route`), add the given checkpoints, write ensemble.json / .png."""
    out_dir = Path(out_dir)
    baselines, rides, routed = list(baselines), list(rides), list(routed)
    specs: list[RunSpec] = []
    if members:
        if baseline_cfg is None:
            raise ValueError("--members needs the baseline recipe (--config)")
        specs += member_specs(baseline_cfg, members, out_dir, datasets)
    rspecs = []
    if ride_experts:
        if ride_cfg is None:
            raise ValueError("--ride-experts needs the RIDE recipe (--ride-config)")
        rspecs = ride_run_specs(ride_cfg, ride_experts, out_dir, datasets)
    if specs or rspecs:
        train_runs(specs + rspecs, workers=workers, log=log)
    baselines += [str(s.final_checkpoint) for s in specs]
    rides += [str(s.final_checkpoint) for s in rspecs]
    notes = []
    if route and rspecs:
        routed += [str(p) for p in route_runs(rspecs, log)]
    elif rspecs:
        notes.append("RIDE points are all-experts (and first-k-experts) only: pass --route to train and add the routed models")
    log(f"ensemble: evaluating {plural(len(baselines), 'baseline')}, {plural(len(rides), 'RIDE network')} and "
        f"{plural(len(routed), 'routed network')} on the test set")
    report = ensemble_report(baselines, rides, routed, overrides=overrides, thresholds=thresholds, prefixes=prefixes,
                             datasets=datasets, log=log)
    report.notes += notes
    write_json(report.as_dict(), out_dir / "ensemble.json")
    plot_ensemble(report, out_dir / "ensemble.png")
    log(report.summary())
    log(f"wrote {out_dir / 'ensemble.json'} and {out_dir / 'ensemble.png'}")
    return report


def _plot_groups(points: list[EnsemblePoint]) -> list[tuple[str, str, list[EnsemblePoint]]]:
    """(label, matplotlib format, points) per line: the baseline ensembles; RIDE with all experts
    (across networks); per RIDE network its first 1..E experts (ending at its all-experts point);
    per routed network its threshold(s)."""
    groups: list[tuple[str, str, list[EnsemblePoint]]] = []
    base = [p for p in points if p.family == FAMILIES[0]]
    if base:
        groups.append(("baseline ensembles", "o-", base))
    full = [p for p in points if p.family == FAMILIES[2]]
    if full:
        groups.append(("RIDE, all experts", "s-", full))
    for fam, fmt, what in ((FAMILIES[1], "s--", "first k experts"), (FAMILIES[3], "*-", "routed")):
        ckpts = dict.fromkeys(p.detail["checkpoint"] for p in points if p.family == fam)
        for ckpt in ckpts:
            pts = [p for p in points if p.family == fam and p.detail["checkpoint"] == ckpt]
            if fam == FAMILIES[1]:
                pts += [p for p in full if p.detail["checkpoint"] == ckpt]
            groups.append((f"RIDE-{pts[0].detail['experts_in_network']}, {what}", fmt, pts))
    return groups


def plot_ensemble(report: EnsembleReport, path: str | Path) -> Path:
    """Accuracy (overall, and few-shot) against MMACs per image, one line per family and network."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0), dpi=120)
    for ax, split in zip(axes, ("overall", "few")):
        annotated = set()
        for label, fmt, pts in _plot_groups(report.points):
            pts = sorted(pts, key=lambda p: p.macs)
            xs = [p.macs / 1e6 for p in pts]
            ys = [getattr(p.accuracy, split) for p in pts]
            routed = fmt.startswith("*")
            ax.plot(xs, ys, fmt, label=label, markersize=10 if routed else 5, alpha=0.6 if "--" in fmt else 1.0)
            for p, x, y in zip(pts, xs, ys):
                if id(p) in annotated:  # an all-experts point also ends its network's first-k line
                    continue
                annotated.add(id(p))
                ax.annotate(f"{p.size:.2f}" if routed else f"{p.size:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("MMACs per image")
        ax.set_ylabel("overall accuracy (%)" if split == "overall" else "few-shot accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report.data['name']}: accuracy against cost (numbers: members / experts / mean experts used)", fontsize=10)
    return save_figure(fig, path)


__all__ = ["FAMILIES", "EnsemblePoint", "EnsembleReport", "ensemble_report", "member_specs", "plot_ensemble", "ride_run_specs",
           "route_runs", "run_ensemble"]
