"""The raw-results writer (benchmarks/_results.py, called by benchmarks/conftest.py): a timed
run gives one JSON file per benchmark module with the machine, versions, command, date and
each test's stats and extra_info; a disabled run (CI) writes nothing."""
from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

from _results import cpu_info, machine_slug, module_of, summary, write_results
from pytest_benchmark.stats import Metadata

NOW = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc)
CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
cpu family\t: 6
model\t\t: 143
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def _timed(fullname: str, seconds: list[float], **extra) -> Metadata:
    """A pytest-benchmark Metadata as its fixture leaves it after `pedantic`."""
    fixture = SimpleNamespace(name=fullname.split("::")[-1], fullname=fullname, group=None, param="cpu",
                              params={"where": "cpu"}, extra_info=dict(extra), cprofile_stats=None)
    meta = Metadata(fixture, iterations=1, options={})
    for s in seconds:
        meta.update(s)
    return meta


def _run(*benchmarks, disabled=False):
    return SimpleNamespace(disabled=disabled, benchmarks=list(benchmarks))


def test_a_timed_run_writes_one_file_per_module_with_machine_versions_command_date_and_stats(tmp_path):
    step = _timed("benchmarks/test_bench_train_step.py::test_train_step[cpu-r32_e3-bf16]", [0.4, 0.5, 0.6],
                  images_per_s=256.0, speedup_vs_original=2.0)
    routed = _timed("benchmarks/test_bench_routed.py::test_routed_inference_time_follows_macs[cpu-routed]", [0.2, 0.3],
                    time_ratio=0.8, macs_ratio=0.748)
    windows = {"routed": {"started_utc": "2026-01-02T03:00:00+00:00", "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 1.0, 1.0]}}
    paths = write_results(_run(step, routed), command="python -m pytest benchmarks --benchmark-only",
                          results_dir=tmp_path, outcomes={routed.fullname: "failed"}, windows=windows, now=NOW)

    assert sorted(p.relative_to(tmp_path).parts[0] for p in paths) == ["routed", "train_step"]
    for path in paths:
        assert path.name.startswith("2026-01-02T0304Z_")
        record = json.loads(path.read_text())
        assert {"module", "date_utc", "command", "environment", "git", "machine", "versions", "tests"} <= set(record)
        assert record["date_utc"] == "2026-01-02T03:04:00+00:00"
        assert record["command"] == "python -m pytest benchmarks --benchmark-only"
        cpu = record["machine"]["cpu"]
        assert {"model", "logical_cores", "flags"} <= set(cpu)
        assert {"amx_bf16", "avx512_bf16"} <= set(cpu["flags"])
        assert "gpu" in record["machine"]
        assert {"python", "torch", "triton", "dali"} <= set(record["versions"])
        assert record["versions"]["torch"]
        (test,) = record["tests"]
        assert {"min", "median", "mean", "stddev", "rounds", "data"} <= set(test["stats"])
        assert test["extra_info"]

    step_record = json.loads((tmp_path / "train_step").glob("*.json").__next__().read_text())
    (test,) = step_record["tests"]
    assert test["stats"]["rounds"] == 3 and abs(test["stats"]["median"] - 0.5) < 1e-12
    assert test["extra_info"] == {"images_per_s": 256.0, "speedup_vs_original": 2.0}
    routed_record = json.loads((tmp_path / "routed").glob("*.json").__next__().read_text())
    assert routed_record["tests"][0]["outcome"] == "failed"
    assert routed_record["load_start"] == [1.0, 1.0, 1.0] and routed_record["load_end"] == [2.0, 1.0, 1.0]
    lines = summary(routed_record)
    assert len(lines) == 3 and "time_ratio=0.8" in lines[2] and "failed" in lines[2]


def test_a_disabled_or_untimed_run_writes_nothing(tmp_path):
    step = _timed("benchmarks/test_bench_train_step.py::test_train_step[cpu]", [0.5])
    assert write_results(_run(step, disabled=True), command="pytest", results_dir=tmp_path, now=NOW) == []
    assert write_results(_run(), command="pytest", results_dir=tmp_path, now=NOW) == []
    assert write_results(None, command="pytest", results_dir=tmp_path, now=NOW) == []
    assert not any(tmp_path.iterdir())


def test_the_results_folder_can_be_moved_or_switched_off(tmp_path, monkeypatch):
    step = _timed("benchmarks/test_bench_routed.py::test_routed[cpu]", [0.5])
    monkeypatch.setenv("RIDE_FAST_BENCH_RESULTS", "off")
    assert write_results(_run(step), command="pytest", now=NOW) == []
    monkeypatch.setenv("RIDE_FAST_BENCH_RESULTS", str(tmp_path / "elsewhere"))
    (path,) = write_results(_run(step), command="pytest", now=NOW)
    assert path.parent == tmp_path / "elsewhere" / "routed"


def test_runs_within_the_same_minute_keep_every_file(tmp_path):
    first = _timed("benchmarks/test_bench_ride_loss.py::test_loss[cpu]", [0.5], speedup_median=3.7)
    second = _timed("benchmarks/test_bench_ride_loss.py::test_loss[cpu]", [0.6], speedup_median=3.1)
    third = _timed("benchmarks/test_bench_ride_loss.py::test_loss[cpu]", [0.7], speedup_median=3.5)
    paths = [write_results(_run(step), command="pytest", results_dir=tmp_path, now=NOW)[0] for step in (first, second, third)]

    assert [p.name for p in paths] == [paths[0].name, paths[0].stem + "-2.json", paths[0].stem + "-3.json"]
    assert [json.loads(p.read_text())["tests"][0]["extra_info"]["speedup_median"] for p in paths] == [3.7, 3.1, 3.5]


def test_machine_description_and_names():
    cpu = cpu_info(CPUINFO)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["flags"]["amx_bf16"] and cpu["flags"]["avx512_bf16"] and not cpu["flags"]["amx_int8"]
    assert machine_slug({"cpu": {"model": "Intel(R) Xeon(R) Processor", "logical_cores": 2}, "gpu": None}) == \
        "cpu-intel-xeon-processor-2c"
    assert machine_slug({"cpu": {}, "gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "gpu-nvidia-h100-80gb-hbm3"
    assert module_of("benchmarks/test_bench_ride_loss.py::test_ride_loss[eager]") == "ride_loss"


def test_mfu_divides_by_the_peak_of_the_board_that_ran():
    from _results import bf16_dense_tflops

    assert bf16_dense_tflops("NVIDIA H100 80GB HBM3") == bf16_dense_tflops("NVIDIA H200") == 989.0  # SXM
    assert bf16_dense_tflops("NVIDIA H200 NVL") == bf16_dense_tflops("NVIDIA H100 NVL") == 835.0
    assert bf16_dense_tflops("NVIDIA H100 PCIe") == 756.0
