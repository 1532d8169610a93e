"""Loss tests use tiny tensors: run them on one intra-op thread.

With two threads on a busy two-core machine, every tiny op pays an OpenMP hand-off (measured:
log_softmax of a [2, 3, 5] tensor 0.02 ms on one thread, 15 ms on two under load), which made
gradcheck dominate the run. The previous thread count is restored after each test.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
