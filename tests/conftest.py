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


@pytest.fixture
def no_tf32():
    """True float32 convolutions and matrix products for the test, restored after it. Plain
    assignment, not monkeypatch: torch.backends.cuda.matmul answers `allow_tf32` through
    __getattr__, so monkeypatch would try to delete it again on undo and fail the teardown."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
