"""The whole training step as one CUDA graph (train.cuda_graphs; docs/method.md §8).

`StepGraphs` runs a step function eagerly for a few warm-up calls of each signature, then captures
one call into a graph and replays it for every later batch of that signature: forward, loss,
backward, the non-finite skip flag, the BatchNorm guard, the fused SGD step (lr read from a device
tensor), GradScaler's update and the metric sums are then one launch. The batch is copied into the
graph's static input tensors first; nothing is read back to the host.

What a replay cannot see is Python state: the signature therefore holds every Python value the
step branches on (batch shape, DRW phase, training flags; `TrainStep._graph_key`), and the graphs
are dropped when the tensors they captured are replaced (an optimizer state loaded on resume).

`CudaGraphBackend` is the capture machinery; a backend with the same three methods stands in for
it in the CPU tests (tests/engine/_graph_emulator.py replays recorded ATen calls).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ride_fast.engine.monitor import LOGGER

WARMUP_CALLS = 3  # eager calls of a signature before its capture (cuDNN autotuning, lazy state, allocator)
WARMUP_CALLS_DDP = 11  # DDP builds its gradient buckets over its first iterations (PyTorch's CUDA-graph notes)
MAX_GRAPHS = 2  # graphs kept (each holds its activations' memory): the full batch and an epoch's short last batch


class CudaGraphBackend:
    """torch.cuda graphs: warm-up and capture on one side stream (the recipe in PyTorch's CUDA
    semantics notes), each graph with its own memory pool."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"train.cuda_graphs=true needs a CUDA device, the run is on {self.device}; set train.cuda_graphs=false")
        self.stream = torch.cuda.Stream(self.device)

    @contextlib.contextmanager
    def warmup(self):
        """Run on the capture stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record fn (nothing runs; torch.cuda.graph synchronises first) and return (graph, fn's
        output: a tensor in the graph's memory, rewritten by every replay). Thread-local capture:
        loader threads (pinning, DALI) may call CUDA meanwhile."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                out = fn()
        except BaseException:
            # a capture that fails to end leaves the capture stream current (the graph context
            # restores the stream only after capture_end): later work would queue on it
            torch.cuda.set_stream(current)
            raise
        return graph, out

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()


@dataclass
class _Captured:
    graph: object
    images: torch.Tensor  # static inputs: each batch is copied in before the replay
    labels: torch.Tensor
    loss: torch.Tensor  # the step's (static) output


class StepGraphs:
    """Run `step(images, labels) -> loss` through captured graphs, one per signature.

    `__call__(key, images, labels, owner)`: key is the signature (hashable; it must hold every
    Python value the step branches on), owner the object whose replacement makes every graph stale
    (compared by identity; the optimizer's state dict). The first `warmup` calls of a key run
    eagerly (inside the backend's warm-up context); the next one captures and replays; later ones
    only copy the batch in and replay. The returned loss is a copy, safe past the next replay.
    At most `max_graphs` graphs are kept: a key without a graph drops the least recently replayed
    one before its warm-up, or before its recapture when its own graph was dropped (after the DRW
    switch, the first phase's graphs go).
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], backend, warmup: int = WARMUP_CALLS,
                 max_graphs: int = MAX_GRAPHS):
        if warmup < 1:
            raise ValueError(f"a step graph needs at least one eager warm-up call, got warmup={warmup}")
        self.step, self.backend, self.warmup, self.max_graphs = step, backend, int(warmup), int(max_graphs)
        self.graphs: dict[Hashable, _Captured] = {}  # least recently replayed first
        self.calls: dict[Hashable, int] = {}  # eager calls so far, per key
        self.owner: object = None
        self.captures = 0  # graphs captured so far (all keys)

    def drop(self) -> None:
        """Forget every graph and warm-up count (their memory is freed with them)."""
        self.graphs.clear()
        self.calls.clear()

    def __call__(self, key: Hashable, images: torch.Tensor, labels: torch.Tensor, owner: object) -> torch.Tensor:
        if owner is not self.owner:
            self.drop()
            self.owner = owner
        captured = self.graphs.pop(key, None)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:  # no graph for this signature yet: free the oldest one's memory first
                del self.graphs[next(iter(self.graphs))]
            done = self.calls.get(key, 0)
            if done < self.warmup:
                self.calls[key] = done + 1
                with self.backend.warmup():
                    return self.step(images, labels)
            captured = self._capture(images, labels)  # its static inputs hold this batch already
        else:
            captured.images.copy_(images)
            captured.labels.copy_(labels)
        self.graphs[key] = captured  # now the most recent
        self.backend.replay(captured.graph)
        return captured.loss.clone()

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> _Captured:
        static_images, static_labels = images.clone(), labels.clone()  # same strides (channels-last)
        graph, loss = self.backend.capture(lambda: self.step(static_images, static_labels))
        self.captures += 1
        LOGGER.debug(f"train.cuda_graphs: step captured for a batch of {images.shape[0]} after {self.warmup} eager steps "
                     f"({self.captures} captured so far, {len(self.graphs) + 1} kept)")
        return _Captured(graph, static_images, static_labels, loss)
