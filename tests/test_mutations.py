"""The tests fail when the behaviour they are written for is removed: each case applies one
deliberate breakage (tests/_mutations.py, a pytest plugin: monkeypatches applied before the test
modules are imported; no source file is changed) and runs the tests aimed at that behaviour in a
fresh pytest process; every one of them must fail. The same tests pass unbroken in the suite.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEP = "benchmarks/test_bench_train_step.py::test_train_step"

# mutation -> the tests that must fail under it
TARGETS = {
    "autocast_off": [
        "tests/engine/test_engine_trainer.py::test_mixed_precision_and_channels_last_on_cpu[bf16]",
        f"{TRAIN_STEP}[cpu-r32_e3-bf16]",
    ],
    "momentum_ignored": [
        "tests/engine/test_engine_optim.py::test_three_steps_equal_torch_nesterov_sgd[fused]",
        "tests/engine/test_engine_optim.py::test_three_steps_equal_torch_nesterov_sgd[foreach]",
        "tests/engine/test_engine_optim.py::test_three_steps_equal_torch_nesterov_sgd[loop]",
        "tests/engine/test_engine_optim.py::test_one_step_is_the_nesterov_formula",
        f"{TRAIN_STEP}[cpu-r32_e3-fused_sgd]",
    ],
    "flip_never": ["tests/data/test_data_transforms.py::test_random_hflip_mirrors_some_images_of_a_seeded_batch_and_keeps_the_others"],
    "crop_identity": ["tests/data/test_data_transforms.py::test_random_crop_shifts_by_offsets_that_vary_over_a_seeded_batch"],
    "rotation_mirrored": ["tests/data/test_data_transforms.py::test_rotation_matches_the_affine_grid_reference_at_the_drawn_angle"],
    "jitter_dropped": ["tests/data/test_data_transforms.py::test_jittered_batch_is_the_unjittered_batch_through_the_drawn_colour_maps"],
    "router_dense": [
        "tests/router/test_router_inference.py::test_each_expert_runs_only_on_the_images_that_continue[3]",
        "tests/router/test_router_inference.py::test_each_expert_runs_only_on_the_images_that_continue[5]",
        "benchmarks/test_bench_routed.py::test_routed_forward_executes_the_macs_it_is_charged",
    ],
    "fused_loss_to_reference": [f"{TRAIN_STEP}[cpu-r32_e3-fused_loss]"],
    "batched_ignored": [f"{TRAIN_STEP}[cpu-r32_e3-batched]"],
    "fused_norm_to_reference": [
        f"{TRAIN_STEP}[cpu-r32_e3-channels_last]",
        f"{TRAIN_STEP}[cpu-r50_e3-batched]",
        "tests/ops/test_ops_batch_norm_act.py::test_matches_pytorch_in_float64[8-16-6-True-True-0.1-1-float32]",
        f"{TRAIN_STEP}[cpu-r32_e3-bf16]",
    ],
    "conv3x3_to_module": [
        f"{TRAIN_STEP}[cpu-r32_e3-channels_last]",
        "tests/ops/test_ops_conv3x3.py::test_a_ride_resnet32_step_runs_every_stride_1_conv_of_its_blocks_through_the_kernel[batched]",
        "tests/ops/test_ops_conv3x3.py::test_matches_the_convolution_in_float64[24-2-3-16-16-1]",
    ],
    "bf16_conv3x3_to_onednn": [
        "tests/ops/test_ops_conv3x3.py::test_under_bf16_autocast_on_a_cpu_with_slow_bf16_products_the_kernel_reads_and_writes_bf16[24-2-3-16-16]",
        "tests/ops/test_ops_conv3x3.py::test_a_ride_resnet32_step_under_bf16_autocast_runs_the_kernel_where_bf16_products_are_slow",
    ],
    "channels_last_ignored": [
        "tests/engine/test_engine_trainer.py::test_mixed_precision_and_channels_last_on_cpu[bf16]",
        f"{TRAIN_STEP}[cpu-r32_e3-channels_last]",
    ],
}


def run_mutated(mutation: str, tests: list[str]) -> tuple[dict[str, str], str]:
    """Run `tests` under `mutation` in a fresh pytest; returns ({failed node id: reason}, output)."""
    # COLUMNS: a wide terminal, so that the summary line of a failure carries its reason
    env = dict(os.environ, RIDE_FAST_MUTATION=mutation, OMP_NUM_THREADS="1", RIDE_FAST_BENCH_THREADS="1", COLUMNS="2000")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "_mutations", "-p", "no:cacheprovider", "-q", "-rf",
                           "--benchmark-disable", *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    failed = dict(re.findall(r"^FAILED (\S+)(?: - (.*))?$", out, flags=re.M))
    return failed, out


@pytest.mark.parametrize("mutation", list(TARGETS))
def test_the_targeted_tests_fail_under_the_mutation(mutation):
    failed, out = run_mutated(mutation, TARGETS[mutation])
    missed = [t for t in TARGETS[mutation] if t not in failed]
    assert not missed, f"{mutation}: these tests still pass: {missed}\n{out[-3000:]}"
    # they fail on an assertion of the behaviour, not on an error of the mutation itself
    crashed = {t: why for t, why in failed.items() if not why.startswith(("AssertionError", "assert "))}
    assert not crashed, f"{mutation}: {crashed}"
