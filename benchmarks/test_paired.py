"""The paired timer of the goal benchmarks: A B B A order, ratios per pair, and its summary."""
from __future__ import annotations

import time

import pytest
from _paired import PairedTimes, time_paired


def test_pairs_alternate_their_order_after_the_warmup():
    calls = []
    paired = time_paired(lambda: calls.append("a"), lambda: calls.append("b"), pairs=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(paired.a) == len(paired.b) == 4


def test_each_pair_times_both_sides_under_the_same_call():
    paired = time_paired(lambda: time.sleep(0.03), lambda: time.sleep(0.001), pairs=2, warmup=0)
    assert all(ta >= 0.03 and ta > tb for ta, tb in zip(paired.a, paired.b))
    assert all(s > 1 for s in paired.speedups)


def test_summary_is_the_median_of_the_pair_ratios():
    paired = PairedTimes(a=[4.0, 9.0, 3.0], b=[1.0, 3.0, 2.0])
    assert paired.speedups == [4.0, 3.0, 1.5] and paired.time_ratios == pytest.approx([0.25, 1 / 3, 2 / 3])
    s = paired.summary()
    assert (s["speedup_median"], s["speedup_min"], s["speedup_max"]) == (3.0, 1.5, 4.0)
    assert s["speedup_of_fastest"] == 3.0 and s["baseline_s_median"] == 4.0 and s["contender_s_median"] == 2.0
