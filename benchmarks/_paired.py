"""Paired timing for the speed-up goals: a baseline and a contender timed in A B B A order.

On a shared host the load drifts within seconds, so two numbers taken one after the other compare
the load as much as the code. Timing the two in alternation (A B, then B A, ...) and taking the
ratio of each pair puts both under the same load; the median of the pair ratios is the number a
goal is checked against.

    paired = time_paired(original, ride_fast, pairs=8)
    paired.summary()["speedup_median"]      # median over pairs of t(original) / t(ride_fast)

`use_bench_threads` sets the CPU threads by the rule every benchmark follows.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedTimes:
    """Seconds per call of the baseline (`a`) and the contender (`b`), pair by pair."""

    a: list[float]
    b: list[float]

    @property
    def speedups(self) -> list[float]:
        """t(a) / t(b) per pair: how many times faster the contender ran under the same load."""
        return [ta / tb for ta, tb in zip(self.a, self.b)]

    @property
    def time_ratios(self) -> list[float]:
        """t(b) / t(a) per pair: the contender's time as a share of the baseline's."""
        return [tb / ta for ta, tb in zip(self.a, self.b)]

    def summary(self) -> dict:
        """Median, min and max of the pair speed-ups, the speed-up of the fastest calls, and the
        median seconds of each side: the extra_info of a goal benchmark."""
        s = self.speedups
        return {
            "pairs": len(s),
            "speedup_median": statistics.median(s),
            "speedup_min": min(s),
            "speedup_max": max(s),
            "speedup_of_fastest": min(self.a) / min(self.b),
            "baseline_s_median": statistics.median(self.a),
            "contender_s_median": statistics.median(self.b),
            "speedups": [round(x, 4) for x in s],
        }


def use_bench_threads(timing: bool) -> int:
    """Set torch's CPU threads for a benchmark and return them: RIDE_FAST_BENCH_THREADS, else every
    core when timing and one in CI (each case run once; two OpenMP teams on a shared 2-core machine
    stall)."""
    import torch

    torch.set_num_threads(int(os.environ.get("RIDE_FAST_BENCH_THREADS", (os.cpu_count() or 1) if timing else 1)))
    return torch.get_num_threads()


def time_paired(a: Callable[[], object], b: Callable[[], object], pairs: int, warmup: int = 1) -> PairedTimes:
    """Time `a` and `b` (each a complete call: a device is synchronised inside) `pairs` times, in
    A B B A order, after `warmup` untimed calls of each."""
    for _ in range(warmup):
        a()
        b()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(pairs):
        for name, fn in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return PairedTimes(times["a"], times["b"])
