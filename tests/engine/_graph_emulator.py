"""A CPU stand-in for CUDA graph capture, to test a captured training step without a GPU.

`RecordingBackend` has the three methods of `ride_fast.engine.step_graph.CudaGraphBackend`.
Its capture records every ATen call the step makes (a TorchDispatchMode, below autograd and
autocast: the kernels a CUDA graph would hold), with the very tensors each call read and wrote;
a replay runs those calls again on those tensors, and no Python of the step runs. So, as with a
CUDA graph:
- a Python value read at capture (a float lr, a DRW phase, a flag) is frozen into the replay;
- state that the step's Python replaces by a new tensor (instead of writing in place) is not
  seen by later replays;
- a host read inside the step (`.item()`, `bool(t)`) fails the capture, and so does a tensor made
  from Python data (`torch.tensor`, `new_tensor`: on a GPU, a copy from host memory);
- the capture itself leaves no trace: every tensor it wrote that existed before is put back (a
  CUDA capture records and does not run).
Each replayed call that returns new tensors writes its results into the tensors the capture
returned (a graph's outputs live at fixed addresses); view calls are not re-run (their outputs
alias tensors that are).

What it cannot model: stream and allocator rules, pinned memory, copies of CPU tensors to the
device inside the capture (on the CPU they are no copies), and anything below ATen (a custom
operator is one call, like a kernel launch).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.nonzero.default}
#: a tensor made from Python data (`torch.tensor`, `new_tensor`, `as_tensor`): on a GPU a copy from
#: host memory, which a graph would replay from an address that no longer holds the data
FROM_HOST = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


UNINITIALISED = {torch.ops.aten.empty.memory_format, torch.ops.aten.new_empty.default, torch.ops.aten.empty_like.default,
                 torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty_strided.default}


class HostReadInCapture(RuntimeError):
    pass


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.created: set[int] = set()  # ids of tensors the capture allocated
        self.keep: list[torch.Tensor] = []  # keeps them alive, so their ids stay unique
        # every pre-existing tensor a call saw, as it was then: (tensor, copy). All of them, not only
        # those the schemas mark as written: native_batch_norm updates its running statistics unmarked.
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise HostReadInCapture(f"{func} reads a device value on the host inside the captured step")
        if func in FROM_HOST:
            raise HostReadInCapture(f"{func}: a tensor made from Python data inside the captured step (a copy from the host on a GPU)")
        for t in _tensors((args, kwargs)):
            if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
                continue  # an expanded view: never written (and not writable)
            if id(t) not in self.created and id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        if not func.is_view and func.namespace != "profiler":  # record_function markers are not kernels
            self.calls.append((func, args, kwargs, out))
            for t in _tensors(out):
                self.created.add(id(t))
                self.keep.append(t)
        return out


class RecordedGraph:
    def __init__(self, calls):
        self.calls = calls
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.calls:
                if func in UNINITIALISED:  # a graph's buffer holds whatever is there (and `set_` may re-point it)
                    continue
                fresh = func(*args, **kwargs)
                for old, new in zip(_tensors(out), _tensors(fresh)):
                    if old is not new and old.data_ptr() != new.data_ptr():
                        old.copy_(new)
        self.replays += 1


class RecordingBackend:
    """The CPU stand-in for `CudaGraphBackend`: see the module docstring."""

    def __init__(self):
        self.graphs: list[RecordedGraph] = []
        self.warmups = 0

    @contextlib.contextmanager
    def warmup(self):
        self.warmups += 1
        yield

    def capture(self, fn):
        recorder = _Recorder()
        with recorder:
            out = fn()
        with torch.no_grad():  # a CUDA capture does not run: undo what this one wrote
            for t, copy in reversed(recorder.saved.values()):  # the first sight of a memory wins (views)
                t.copy_(copy)
        graph = RecordedGraph(recorder.calls)
        self.graphs.append(graph)
        return graph, out

    def replay(self, graph: RecordedGraph) -> None:
        graph.replay()
