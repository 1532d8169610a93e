"""Benchmarks (pytest-benchmark). `pytest benchmarks --benchmark-only` times them; in CI they run
once each as plain tests with `--benchmark-disable`. Without CUDA, `gpu`-marked cases are skipped
(the same rule as tests/conftest.py, which does not reach this folder).

A timed run writes its raw results, one JSON file per benchmark module, under
benchmarks/results/<module>/ (machine, versions, command, date, each test's stats and extra_info;
see benchmarks/_results.py). A `--benchmark-disable` run writes nothing.
"""
import datetime as dt

import pytest
import torch
from _results import command_line, load_average, module_of, write_results

_OUTCOMES: dict[str, str] = {}  # nodeid -> "passed" / "failed" / "skipped"
_WINDOWS: dict[str, dict] = {}  # module -> {"started_utc", "load_start", "load_end"}


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_disable", False):
        # cases that only measure are not run as tests at all (no skip: a skip means a missing
        # device or package)
        timing = [item for item in items if "timing" in item.keywords]
        if timing:
            config.hook.pytest_deselected(items=timing)
            items[:] = [item for item in items if "timing" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords and "benchmarks" in str(item.fspath):
            item.add_marker(skip)


def pytest_runtest_setup(item):
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _WINDOWS.setdefault(module_of(item.nodeid), {"started_utc": now, "load_start": load_average()})


def pytest_runtest_teardown(item):
    if module_of(item.nodeid) in _WINDOWS:
        _WINDOWS[module_of(item.nodeid)]["load_end"] = load_average()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # a failed setup or teardown counts too
        if _OUTCOMES.get(report.nodeid) != "failed":
            _OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session):
    """Write the raw results of a timed run (nothing under --benchmark-disable)."""
    written = write_results(getattr(session.config, "_benchmarksession", None),
                            command=command_line(session.config.invocation_params.args), outcomes=_OUTCOMES, windows=_WINDOWS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for path in written:
        if reporter is not None:
            reporter.write_line(f"benchmark results: {path}")
