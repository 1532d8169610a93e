import json

import pytest

from ride_fast.analysis import ensemble_report, run_ensemble
from ride_fast.analysis.common import (
    collect_outputs,
    eval_loader,
    load_analysis_checkpoint,
    split_summary,
)
from ride_fast.analysis.ensemble import FAMILIES
from ride_fast.profiling import model_cost


def test_points_costs_and_accuracies(trained, pool, lt_train):
    data = (lt_train, pool[1])
    report = ensemble_report([trained["ce_a"], trained["ce_b"]], [trained["ride"]], [trained["routed"]],
                             thresholds=[0.0, 1.0], datasets=data, log=lambda s: None)
    by_family = {f: [p for p in report.points if p.family == f] for f in FAMILIES}
    assert [len(by_family[f]) for f in FAMILIES] == [2, 1, 1, 2]

    one = load_analysis_checkpoint(trained["ce_a"], datasets=data)
    single = model_cost(one.model, 12).total_macs
    ens = by_family["baseline ensemble"]
    assert [p.macs for p in ens] == [single, 2 * single]  # members add their full cost
    out = collect_outputs(one.model, eval_loader(one.cfg, pool[1], one.device))
    assert ens[0].accuracy.overall == pytest.approx(split_summary(out.logits.argmax(1), out.labels, one.class_counts).overall)

    ride = load_analysis_checkpoint(trained["ride"], datasets=data)
    cost = model_cost(ride.model, 12)
    first, full = by_family["RIDE, first k experts"][0], by_family["RIDE, all experts"][0]
    assert (first.size, first.macs, full.size, full.macs) == (1, cost.macs_with(1), 2, cost.macs_with(2))

    # threshold 0: every image asks for expert 2 (cost of both experts + one router, accuracy of all experts);
    # threshold 1: nobody does (expert 1 alone + one router)
    always, never = sorted(by_family["RIDE, routed"], key=lambda p: p.detail["threshold"])
    assert always.size == 2 and never.size == 1
    assert cost.macs_with(2) < always.macs < cost.macs_with(2) + 10_000
    assert cost.macs_with(1) < never.macs < cost.macs_with(1) + 10_000
    assert always.accuracy.overall == pytest.approx(full.accuracy.overall)
    assert never.accuracy.overall == pytest.approx(first.accuracy.overall)


def test_run_ensemble_writes_json_and_png_and_trains_missing_members(tmp_path, trained, pool, lt_train, make_cfg,
                                                                      baseline_overrides):
    data = (lt_train, pool[1])
    base = make_cfg("unused", *baseline_overrides)
    messages = []
    report = run_ensemble(tmp_path, rides=[trained["ride"]], baseline_cfg=base, members=2, datasets=data, prefixes=False,
                          log=messages.append)
    assert (tmp_path / "baseline" / "member_001" / "last.pt").is_file()
    out = json.loads((tmp_path / "ensemble.json").read_text())
    assert [p["family"] for p in out["points"]] == ["baseline ensemble"] * 2 + ["RIDE, all experts"]
    assert (tmp_path / "ensemble.png").stat().st_size > 0
    assert report.points[1].detail["members"][1].endswith("member_001/last.pt")


def test_nothing_to_compare_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to compare"):
        ensemble_report()
    with pytest.raises(ValueError, match="--config"):
        run_ensemble(tmp_path, members=2)


def test_routed_points_are_not_timed(trained, pool, lt_train, monkeypatch):
    """An ensemble point holds accuracy and MACs; the routed evaluation's timing phase is skipped."""
    from ride_fast.engine import routed_eval

    def refuse(*args, **kwargs):
        raise AssertionError("the ensemble analysis does not time the routed model")

    monkeypatch.setattr(routed_eval, "time_routed", refuse)
    report = ensemble_report(routed=[trained["routed"]], thresholds=[0.5], datasets=(lt_train, pool[1]), log=lambda s: None)
    assert [p.family for p in report.points] == ["RIDE, routed"]
