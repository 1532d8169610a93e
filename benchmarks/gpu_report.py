"""The GPU check's report, rebuilt from its rows alone.

    python benchmarks/gpu_report.py DIR      reads DIR/rows.jsonl, writes DIR/report.md and prints it

Exit status 1 when any step failed or timed out (or no row says the run began), else 0. A step
that started without an end row (the run was killed during it), and a planned step that never
started, count as timed out. A line cut short by a kill is left out.
"""
from __future__ import annotations

import sys
from pathlib import Path

from gpu_steps import STATUSES, read_rows

LOSS_COLUMNS = ("case", "provider", "ms", "timed_by", "ms_stream", "gbps", "pct_copy_bw", "pct_floor_time", "predicted_pct_floor", "x_eager",
                "x_compile", "x_default")
KERNEL_COLUMNS = ("fwd_kernel_us", "predicted_fwd_us", "fwd_pct_copy_bw", "bwd_kernel_us", "predicted_bwd_us", "bwd_pct_copy_bw",
                  "other_kernels_us")
VARIANT_COLUMNS = ("case", "provider", "ms", "x_default", "fwd_kernel_us", "bwd_kernel_us", "kernels_pct_copy_bw",
                   "predicted_pct_floor", "predicted_fwd_us", "predicted_bwd_us", "bwd_kernel_us_after_scrub",
                   "same_gradient_as_default")
WAVE_COLUMNS = ("fwd_kernel_us_rows128", "fwd_kernel_us_rows384", "fwd_kernel_us_rows512")
HIDDEN = {"step", "status", "kind", "case", "target", "target_met", "traceback"}


def step_table(rows: list[dict]) -> list[dict]:
    """One entry per step of the plan (then any other step seen): status, seconds, deadline, reason."""
    plan = next((r for r in rows if r.get("kind") == "plan"), None)
    order = ["imports"] + [s["step"] for s in plan["steps"]] if plan else []
    deadlines = {s["step"]: s["deadline_s"] for s in plan["steps"]} if plan else {}
    for r in rows:
        if r.get("kind") != "plan" and r["step"] not in order:
            order.append(r["step"])
    table = []
    for step in order:
        mine = [r for r in rows if r["step"] == step]
        end = next((r for r in reversed(mine) if r.get("kind") == "end"), None)
        targets = [r for r in mine if "target_met" in r]
        entry = {"step": step, "deadline_s": deadlines.get(step), "targets": len(targets),
                 "targets_met": sum(bool(r["target_met"]) for r in targets)}
        if end is not None:
            entry.update(status=end["status"], elapsed_s=end.get("elapsed_s"), reason=end.get("reason", ""))
            if end.get("deadline_s") is not None:  # the plan's deadline plus what earlier steps left unused
                entry["deadline_s"] = end["deadline_s"]
        elif any(r.get("kind") == "start" for r in mine):
            entry.update(status="timed_out", reason="the run ended during this step (no end row)")
        elif step == "imports" and not mine:
            entry.update(status="timed_out", reason="the run ended before its imports were checked")
        else:
            entry.update(status="timed_out", reason="not reached: the run ended before this step")
        table.append(entry)
    return table


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    return str(value).replace("|", "/").replace("\n", " ")


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return out


def build(rows: list[dict]) -> tuple[str, int]:
    """(report markdown, exit status)."""
    plan = next((r for r in rows if r.get("kind") == "plan"), {})
    env = next((r for r in rows if r.get("kind") == "env"), {})
    steps = step_table(rows)
    counts = {s: sum(e["status"] == s for e in steps) for s in STATUSES}
    md = [f"# GPU check ({plan.get('mode', '?')} mode, started {plan.get('started_utc', '?')})", ""]
    if env:
        md.append("Device: " + ", ".join(f"{k} {_fmt(v)}" for k, v in env.items() if k not in HIDDEN and v is not None))
        md.append("")
    md += ["## Steps", ""]
    md += _table(["step", "status", "seconds", "deadline", "targets met", "note"],
                 [[e["step"], e["status"].replace("_", " "), e.get("elapsed_s"), e["deadline_s"],
                   f"{e['targets_met']}/{e['targets']}" if e["targets"] else "", e.get("reason", "")[:200]] for e in steps])
    total = sum(e.get("elapsed_s") or 0 for e in steps)
    md += ["", f"{counts['passed']} passed, {counts['failed']} failed, {counts['timed_out']} timed out, {counts['skipped']} skipped; "
               f"{total:.0f} s of steps (budget {plan.get('budget_s', '?')} s).", ""]
    targets = [r for r in rows if "target_met" in r]
    if targets:
        md += ["## Targets", ""]
        md += _table(["step", "case", "target", "met"], [[r["step"], r.get("case"), r["target"], r["target_met"]] for r in targets])
        md.append("")
    loss = [r for r in rows if r["step"] == "loss_bench" and r.get("kind") == "measure" and r.get("provider")]
    copy = next((r for r in rows if r["step"] == "loss_bench" and r.get("case") == "copy"), None)
    if loss:
        md += ["## RIDE loss, forward + backward", ""]
        if copy:
            md.append(f"Copy bandwidth (read + written): {copy['gbps']:,.0f} GB/s over {copy['bytes'] / 1e9:.2f} GB. "
                      "ms is the CUDA-graph replay time where timed_by says graph, else back-to-back launches (ms_stream; "
                      "graph_error in the rows says why a call was not captured), and the x columns compare times on the "
                      "same clock; GB/s and % of the floor count "
                      "the floor bytes, reading the logits once and writing their gradient once.")
            md.append("")
        md += _table(list(LOSS_COLUMNS) + ["status"], [[r.get(c) for c in LOSS_COLUMNS] + [r["status"]] for r in loss])
        md.append("")
        kernels = [r for r in loss if r.get("fwd_kernel_us") is not None and not r["provider"].startswith("kernels-")]
        if kernels:
            md += ["Fused loss, kernel by kernel (profiler device times, us a call; % of the copy bandwidth for the "
                   "bytes each kernel must move: the forward reads the logits, the backward reads them and writes "
                   "the gradient; predicted: benchmarks/loss_traffic.py):", ""]
            md += _table(["case"] + list(KERNEL_COLUMNS), [[r["case"]] + [r.get(c) for c in KERNEL_COLUMNS] for r in kernels])
            md.append("")
        variants = [r for r in loss if r["provider"].startswith("kernels-") and r.get("fwd_kernel_us") is not None]
        if variants:
            md += ["The fused kernels' variants kernel by kernel (profiler device times, us a call; kernels_pct_copy_bw: "
                   "the floor bytes over both kernels' time; predicted: benchmarks/loss_traffic.py for the same setting; "
                   "bwd_kernel_us_after_scrub: the default backward with 256 MB copied after the forward, so that nothing "
                   "of its rows is left in L2):", ""]
            md += _table(list(VARIANT_COLUMNS), [[r.get(c) for c in VARIANT_COLUMNS] for r in variants])
            md.append("")
        waves = [r for r in loss if r.get("fwd_kernel_us_rows128") is not None]
        if waves:
            md += ["The forward kernel alone on the first 128, 384 and 512 rows (one program an SM, one wave, two waves at "
                   "three programs an SM), us:", ""]
            md += _table(["case", "provider"] + list(WAVE_COLUMNS), [[r["case"], r["provider"]] + [r.get(c) for c in WAVE_COLUMNS] for r in waves])
            md.append("")
    others = [r for r in rows if r.get("kind") == "measure" and r not in loss and r is not copy]
    if others:
        md += ["## Measurements", ""]
        for r in others:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in HIDDEN and v is not None and v != "")
            md.append(f"- **{r['step']}** {r.get('case', '')} ({r['status']}): {shown}")
        md.append("")
    failed_tests = [r for r in rows if r.get("kind") in ("test", "error") and r["status"] == "failed"]
    if failed_tests:
        md += ["## Failures", ""]
        md += [f"- {r['step']}: {r.get('test', 'error')}: {_fmt(r.get('reason', ''))}" for r in failed_tests]
        md.append("")
    tests = [r for r in rows if r.get("kind") == "test"]
    if tests:
        by = {s: sum(r["status"] == s for r in tests) for s in ("passed", "failed", "skipped")}
        md += [f"pytest: {by['passed']} passed, {by['failed']} failed, {by['skipped']} skipped.", ""]
    status = 1 if (counts["failed"] or counts["timed_out"] or not plan) else 0
    return "\n".join(md), status


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python benchmarks/gpu_report.py DIR   (DIR holds the rows.jsonl of a GPU check)", file=sys.stderr)
        return 2
    out = Path(argv[1])
    if not (out / "rows.jsonl").exists():
        print(f"{out / 'rows.jsonl'} not found: run `bash benchmarks/gpu_check.sh --out {out}` first", file=sys.stderr)
        return 2
    text, status = build(read_rows(out))
    (out / "report.md").write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
