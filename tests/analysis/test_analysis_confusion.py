import json

import numpy as np
import pytest
import torch

from ride_fast.analysis import confusion_report, hardest_negatives, run_confusion

COUNTS = [150, 50, 5]  # class 0 many, class 1 medium, class 2 few


def hand_made():
    probs = torch.tensor([
        [0.60, 0.25, 0.15],  # label 0: hardest negative 1 at 0.25
        [0.55, 0.30, 0.15],  # label 2: hardest negative 0 at 0.55, above the target 0.15
        [0.05, 0.60, 0.35],  # label 1: hardest negative 2 at 0.35
    ], dtype=torch.float64)
    return probs.log() + 3.0, torch.tensor([0, 2, 1])  # any shift of the logits gives the same softmax


def test_hardest_negative_of_hand_made_logits():
    logits, labels = hand_made()
    hn = hardest_negatives(logits, labels)
    assert hn.score.tolist() == pytest.approx([0.25, 0.55, 0.35], abs=1e-6)
    assert hn.negative.tolist() == [1, 0, 2]
    assert hn.target.tolist() == pytest.approx([0.60, 0.15, 0.60], abs=1e-6)


def test_the_target_never_counts_as_a_negative():
    logits = torch.tensor([[10.0, 0.0, 0.0, -5.0]])  # the target dominates
    hn = hardest_negatives(logits, torch.tensor([0]))
    assert hn.negative.item() in (1, 2) and hn.score.item() < 1e-4


def test_histograms_per_split():
    logits, labels = hand_made()
    report = confusion_report(hardest_negatives(logits, labels), COUNTS, bins=10)
    assert report.counts["many"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # 0.25
    assert report.counts["medium"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]  # 0.35
    assert report.counts["few"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # 0.55
    assert report.counts["overall"].sum() == 3
    assert report.stats["few"]["share_negative_wins"] == 1.0 and report.stats["many"]["share_negative_wins"] == 0.0
    assert report.stats["overall"]["mean"] == pytest.approx((0.25 + 0.55 + 0.35) / 3, abs=1e-6)
    assert report.as_dict()["splits"]["few"]["fractions"][5] == 1.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        hardest_negatives(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        hardest_negatives(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="bins"):
        confusion_report(hardest_negatives(torch.zeros(2, 3), torch.tensor([0, 1])), COUNTS, bins=0)


def test_checkpoints_baseline_ride_and_routed(tmp_path, trained, pool, lt_train):
    data = (lt_train, pool[1])
    reports = run_confusion([trained["ce_a"], trained["ride"]], tmp_path, names=["CE", "RIDE"], bins=5, datasets=data,
                            log=lambda s: None)
    out = json.loads((tmp_path / "confusion.json").read_text())
    assert set(out["models"]) == {"CE", "RIDE"} and (tmp_path / "confusion.png").stat().st_size > 0
    for r in reports.values():
        assert r.counts["overall"].sum() == len(pool[1])
        assert sum(r.counts[s].sum() for s in ("many", "medium", "few")) == len(pool[1])
    routed = run_confusion([trained["routed"]], tmp_path / "routed", routed=True, datasets=data, log=lambda s: None)
    assert next(iter(routed.values())).counts["overall"].sum() == len(pool[1])
    with pytest.raises(ValueError, match="routed checkpoint"):
        run_confusion([trained["ride"]], tmp_path, routed=True, datasets=data, log=lambda s: None)
    assert np.isfinite(reports["RIDE"].stats["overall"]["mean"])
