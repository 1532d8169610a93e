#!/usr/bin/env bash
# The GPU check: one call proves or disproves every GPU claim of the engine, within a budget.
#
#   bash benchmarks/gpu_check.sh [--quick | --cpu-dry-run] --out DIR
#
# writes DIR/rows.jsonl (one JSON object a line, each with `step` and `status`: passed, failed,
# timed_out or skipped, plus its measurements) and DIR/report.md (`python benchmarks/gpu_report.py
# DIR` rebuilds it from the rows alone). Exit status 1 when any step failed or timed out.
#
# Steps and deadlines in seconds (benchmarks/gpu_steps.py, DEADLINES), full / --quick / --cpu-dry-run:
#
#   env                   5 /  5 / 30   device, versions
#   gpu_tests           160 / 42 / 60   pytest -m gpu: fused-loss kernels at full size, the loss compiled, engine and loader GPU tests
#   loss_bench          130 /105 / 60   1.25 GiB copy bandwidth; RIDE loss fp32/bf16 x mean/pairwise x eager/compile/fused,
#                                       and the fused kernels' variants beside their defaults (tuning, the gradient
#                                       written by the forward)
#   trainer_compile      56 / 40 / 60   the Trainer, bf16, train.compile, CIFAR-size in-memory data, a few hundred steps
#   trainer_cuda_graphs  26 / 16 / 30   the same with train.cuda_graphs (CUDA only)
#   amp_fp16             36 / 22 / 60   fp16 + GradScaler through the fused loss against bf16
#   r50                  50 / 35 / 60   RIDE-R50 E=3 and E=4 train steps, 224 px, bf16, channels-last: images/s, MFU
#   routed                8 /  5 / 60   routed inference: time ratio against the MACs ratio
#   ddp_nccl             28 / 20 / 90   torchrun --nproc_per_node=1 -m ride_fast train (NCCL; gloo on the CPU)
#   e8                   16 / 10 / 60   E = 8 experts through the fused loss
#   dali                  6 /  4 / 30   the DALI mixed (nvJPEG) pipeline, or "not installed"
#   sum                 521 /304        budget: full <= 540 s, --quick <= 320 s on an H100/H200 (the runner's
#                                       start and the report add < 10 s). Each column is what the steps
#                                       took on an H200 with empty compile caches, plus ~10 %, and for
#                                       loss_bench its variants' compiles; the dry run's deadlines only
#                                       bound a broken run: it takes about a minute and a half on two
#                                       idle cores
#   A step may also take the seconds the steps before it left unused (the total stays within the sum).
#
# On a GPU machine the packages that its image may lack (pytest, pytest-benchmark, fvcore, PyYAML, Pillow
# and their dependencies, at the pins of requirements.txt) come from .whl/ (`make gpu-wheels`; git
# ignores it, so copy it along with the checkout),
# installed with --no-index into a private folder. --cpu-dry-run runs the same steps with tiny
# sizes on the CPU (Triton through its interpreter) in the current environment.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//'; }
MODE=full
OUT=gpu_out
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --cpu-dry-run) MODE=dry ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder, e.g. --out gpu_out" >&2; exit 2; }; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; expected [--quick | --cpu-dry-run] --out DIR" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# plugins of other pytest versions in a GPU image must not load into ours (pytest_benchmark is named)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
mkdir -p "$OUT"

if [ "$MODE" != dry ]; then
  SITE=${RIDE_FAST_GPU_SITE:-/tmp/ride_fast_site}
  mkdir -p "$SITE"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || {
      echo "gpu_check.sh: installing the wheels of .whl/ into $SITE failed; rebuild them with 'make gpu-wheels'" >&2; exit 1; }
  fi
  ln -sfn "$PWD/kernels" "$SITE/ride_fast_kernels"   # the kernels folder under its installed name
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
"$PY" benchmarks/gpu_steps.py --mode "$MODE" --out "$OUT" || status=$?
report=0
"$PY" benchmarks/gpu_report.py "$OUT" || report=$?
[ "$status" -ne 0 ] || status=$report
exit "$status"
