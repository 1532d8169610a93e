import pytest
import torch

# One intra-op thread for the tests: their tensors are small, and two OpenMP threads on a 2-core
# machine shared with anything else stall badly (a 60 ms forward was seen taking 10 s). Benchmarks
# set their own thread count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
