"""Summarise a GPU check: pytest-benchmark JSON files + test logs -> one JSON report and a table.

    python3 benchmarks/gpu_report.py OUT_DIR     reads OUT_DIR/bench_*.json, OUT_DIR/env.json,
                                                 OUT_DIR/tests.log; writes OUT_DIR/gpu_report.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def summarise(out: Path) -> dict:
    report: dict = {"env": {}, "tests": {}, "benchmarks": []}
    env = out / "env.json"
    if env.exists():
        report["env"] = json.loads(env.read_text())
    for log in sorted(out.glob("tests*.log")):
        summaries = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        report["tests"][log.stem] = summaries
    step = out / "train_step.json"
    if step.exists():
        report["train_step"] = json.loads(step.read_text())
    for path in sorted(out.glob("bench_*.json")):
        data = json.loads(path.read_text())
        for b in data.get("benchmarks", []):
            stats = b.get("stats", {})
            report["benchmarks"].append({
                "suite": path.stem.removeprefix("bench_"),
                "name": b.get("name"),
                "median_ms": 1e3 * stats.get("median", float("nan")),
                "mean_ms": 1e3 * stats.get("mean", float("nan")),
                "rounds": stats.get("rounds"),
                **b.get("extra_info", {}),
            })
    return report


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "gpu_out")
    report = summarise(out)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str))
    for name, lines in report["tests"].items():
        print(f"{name}: {' | '.join(lines) or 'no summary line'}")
    for b in report["benchmarks"]:
        extra = {k: v for k, v in b.items() if k not in ("suite", "name", "median_ms", "mean_ms", "rounds")}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        print(f"{b['suite']:<10} {b['name']:<60} {b['median_ms']:9.3f} ms  {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
