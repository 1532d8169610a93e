#!/usr/bin/env bash
# One call on a CUDA machine (a few minutes): the GPU tests, the loss-kernel benchmarks and the
# training-step throughput, with a JSON report under $OUT (or ./gpu_out). The pytest benchmarks'
# raw results (benchmarks/_results.py) go to $OUT/results/<module>/: copy them to benchmarks/results/.
#   bash benchmarks/gpu_check.sh            (needs CUDA, torch, triton, pytest, pytest-benchmark;
#                                            fvcore & co. as wheels in .whl/ when missing)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export RIDE_FAST_BENCH_RESULTS=${RIDE_FAST_BENCH_RESULTS:-$(cd "$OUT" && pwd)/results}
SITE=/tmp/ride_fast_site; mkdir -p "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
ln -sfn "$PWD/kernels" "$SITE/ride_fast_kernels"   # the kernels folder under its installed name
export PYTHONPATH="$SITE:$PWD"
python3 - > "$OUT/env.json" <<'PY'
import json, platform, torch, triton
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                  "python": platform.python_version()}))
PY
cat "$OUT/env.json"
start=$SECONDS
# 1. tests: the kernel tests compiled on the GPU (small and full size, every dtype) + every gpu-marked test
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  tests/kernels "$@" 2>&1 | tee "$OUT/tests_kernels.log" | tail -5
timeout ${GPU_TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests \
  --ignore=tests/kernels 2>&1 | tee "$OUT/tests.log" | tail -5
echo "tests took $((SECONDS - start)) s"
# 2. loss kernels: eager, loop-per-expert, Triton at every shape; torch.compile at the target shape
timeout ${BENCH_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_ride_loss.py --benchmark-only \
  --benchmark-max-time=0.3 --benchmark-json="$OUT/bench_loss.json" \
  -k "triton or eager or loop or (compile and B512-E4-C8142-fp32)" 2>&1 | tail -3
echo "loss benchmarks done at $((SECONDS - start)) s"
# 3. training step: original structure vs ride_fast (per-expert, batched, compiled)
timeout ${STEP_TIMEOUT:-200} python3 benchmarks/gpu_train_step.py "$OUT/train_step.json" ${QUICK:-} 2>&1 | grep -v Warning
echo "train step done at $((SECONDS - start)) s"
cat "$OUT/tests_kernels.log" >> "$OUT/tests.log"
python3 benchmarks/gpu_report.py "$OUT"
