"""What a block of code dispatches, for the tests that a path reads nothing back from the device.

    with CountOps() as ops:
        ...
    assert not host_reads(ops.names)
"""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that, on a GPU, read a device value back to the host (bincount: its input's min and max;
# nonzero, boolean indexing and unique: their result's size; item and friends: the value itself)
HOST_READS = ("bincount", "nonzero", "_local_scalar_dense", "item", "is_nonzero", "unique", "_unique")


class CountOps(TorchDispatchMode):
    """Records the name of every ATen op dispatched inside the block, in order (`names`)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_reads(names: list[str]) -> list[str]:
    """The names among `names` of ops that read back to the host on a GPU."""
    return [n for n in names if n.startswith(HOST_READS)]
