"""Benchmarks (pytest-benchmark). `pytest benchmarks --benchmark-only` times them; in CI they run
once each as plain tests with `--benchmark-disable`. Without CUDA, `gpu`-marked cases are skipped
(the same rule as tests/conftest.py, which does not reach this folder).
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords and "benchmarks" in str(item.fspath):
            item.add_marker(skip)
