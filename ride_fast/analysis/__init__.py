"""Analyses of long-tailed classifiers (RIDE paper, Figs. 1, 3 and 7), for RIDE and any other method.

Shape legend: R runs, N test images, E experts, K baseline members, C classes, D feature width.

    decompose(predictions [R, N], labels [N], class_counts [C]) -> BiasVariance      (bias_variance)
    run_bias_variance(cfg, runs=, methods=, workers=, out_dir=)  trains R draws x methods, resumable
    hardest_negatives(logits [N, C], labels [N]) -> HardNegatives(score [N], ...)    (confusion)
    run_confusion(checkpoints, out_dir)                          per-split histograms, JSON + PNG
    run_two_stage(checkpoint, "crt" | "tau_norm" | "cosine")     decoupled classifiers (two_stage,
                                                                 on frozen_heads and tau_validation)
    run_ensemble(out_dir, baselines=, rides=, routed=, ...)      accuracy vs MACs (ensemble)

Every `run_*` writes a JSON report and a PNG; the command line is `ride-fast analyze ...`.
"""
from ride_fast.analysis.bias_variance import (
    METHOD_PRESETS,
    BiasVariance,
    BiasVarianceReport,
    LongTailPool,
    decompose,
    long_tail_pool,
    method_config,
    run_bias_variance,
)
from ride_fast.analysis.confusion import (
    ConfusionReport,
    HardNegatives,
    confusion_report,
    hardest_negatives,
    run_confusion,
)
from ride_fast.analysis.ensemble import (
    EnsemblePoint,
    EnsembleReport,
    ensemble_report,
    run_ensemble,
)
from ride_fast.analysis.frozen_heads import FeatureSet, choose_tau, extract_features, tau_normalize, train_heads
from ride_fast.analysis.runs import RunSpec, run_state, train_runs
from ride_fast.analysis.tau_validation import Validation, validation_split
from ride_fast.analysis.two_stage import TwoStageResult, run_two_stage

__all__ = [
    "METHOD_PRESETS",
    "BiasVariance",
    "BiasVarianceReport",
    "ConfusionReport",
    "EnsemblePoint",
    "EnsembleReport",
    "FeatureSet",
    "HardNegatives",
    "LongTailPool",
    "RunSpec",
    "TwoStageResult",
    "Validation",
    "choose_tau",
    "confusion_report",
    "decompose",
    "ensemble_report",
    "extract_features",
    "hardest_negatives",
    "long_tail_pool",
    "method_config",
    "run_bias_variance",
    "run_confusion",
    "run_ensemble",
    "run_state",
    "run_two_stage",
    "tau_normalize",
    "train_heads",
    "train_runs",
    "validation_split",
]
