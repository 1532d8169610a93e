"""One stage-1 training step, and the batches that feed it.

`TrainStep`: forward (autocast) -> loss -> backward -> optimizer step -> on-device metric sums,
with non-finite steps skipped on the device. `BufferGuard`: the BatchNorm running statistics put
back when a step is skipped. `prefetch_to_device`: host batches copied one step ahead.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed import ReduceOp

from ride_fast.data.dataset import Batch
from ride_fast.engine.distributed import DistContext, all_reduce_
from ride_fast.engine.runtime import autocast_context, keep_host_memory, resolve_amp
from ride_fast.engine.step_graph import WARMUP_CALLS, WARMUP_CALLS_DDP, CudaGraphBackend, StepGraphs
from ride_fast.ops.ride_loss_design import scaled_before_backward


class TrainStep:
    """One stage-1 training step on a batch that is already on the device:

        forward (autocast) -> loss -> backward -> optimizer step -> on-device metric sums

    Nothing here reads the device from the host: the loss, the number of correct mean-logit
    predictions and the non-finite-loss counters are summed into device tensors, read by the caller
    once per log interval (`read_metrics`).

    Non-finite losses: a step whose loss is inf/NaN (on any rank) is skipped. Fused SGD (the
    default) is handed the flag as `found_inf` and skips on the device; fp16 leaves it to GradScaler
    (which skips steps with inf gradients and lowers the scale); a non-fused optimizer reads the flag
    on the host (free on the CPU). The BatchNorm running statistics that the step's forward pass
    updated are put back too (`BufferGuard`), so a NaN image cannot poison the evaluation network.
    `nonfinite` counts the skipped steps, `max_run` the longest run of them in a row, which the
    trainer compares with train.max_nonfinite_steps.

    compile: torch.compile of forward + loss (+ teacher). compile_loss: whether the loss goes into
    the compiled graph (default yes: the RIDE loss is one registered operator on every path, so the
    compiler sees one node).
    cuda_graphs: the whole step (forward, loss, backward, skip flag, BatchNorm guard, fused SGD
    step, GradScaler update, metric sums) captured as one CUDA graph per signature and replayed per
    batch (`StepGraphs`, engine/step_graph.py; with compile, the compiled forward is captured).
    The lr then lives in a device tensor (`set_lr`), the optimizer must be fused SGD, and the
    first few batches of each signature run eagerly. graph_backend: the capture machinery
    (default `CudaGraphBackend`; the CPU tests pass a stand-in).
    dist: the DistContext of a torchrun job (the model is then DDP-wrapped by the caller).
    On the CPU the process keeps freed heap memory for the next step (`keep_host_memory`).

    accumulate_steps (train.accumulate_steps): the batch is split into this many micro-batches (equal
    but for a short last batch), each run forward and backward with its loss scaled by its share of
    the images (1 / accumulate_steps when they are equal), so the summed gradient
    is the mean over the whole batch and the one optimizer step equals the unaccumulated one (the
    losses are means over images; a class-weighted mean divides by the whole batch's weight sum,
    `_weight_sum`). DDP synchronises gradients on the last micro-batch only
    (`no_sync` before). A non-finite loss in any micro-batch skips the whole step. BatchNorm
    normalises each micro-batch with its own statistics (and updates its running statistics once per
    micro-batch): that is the one difference to a step on the whole batch.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp: str = "none",
        teacher: nn.Module | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        compile_loss: bool = True,
        dist: DistContext | None = None,
        accumulate_steps: int = 1,
        graph_backend=None,
    ) -> None:
        self.model, self.criterion, self.optimizer, self.teacher = model, criterion, optimizer, teacher
        self.device = torch.device(device)
        self.dist = dist or DistContext()
        if self.device.type == "cpu":
            keep_host_memory()  # each step reuses the last one's freed activations instead of faulting them in
        self.amp = resolve_amp(amp, self.device)
        self.fused = bool(optimizer.defaults.get("fused"))
        if cuda_graphs and graph_backend is None:
            graph_backend = CudaGraphBackend(self.device)  # refuses a device without CUDA graphs
        if cuda_graphs and not self.fused:  # another optimizer decides the skip on the host, which a graph cannot
            raise ValueError("train.cuda_graphs=true captures the optimizer step, which needs the fused SGD: "
                             "set optim.implementation=fused (or auto), or train.cuda_graphs=false")
        self.accumulate_steps = int(accumulate_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.buffers = BufferGuard([model] + ([teacher] if teacher is not None else []))
        self.forward_loss = self._forward_loss
        self._loss = self._criterion
        if compile:
            if not compile_loss:
                self._loss = torch.compiler.disable(self._criterion)
            self.forward_loss = torch.compile(self._forward_loss)
        self.graphs: StepGraphs | None = None
        self._lr: torch.Tensor | None = None  # with cuda_graphs: the lr every param group reads, on the device
        if cuda_graphs:
            self.graphs = StepGraphs(self._step, graph_backend, warmup=WARMUP_CALLS_DDP if self.dist.enabled else WARMUP_CALLS)
            self._lr = torch.zeros((), dtype=torch.float32, device=self.device)  # fused SGD reads a float32 lr tensor
            self.set_lr(optimizer.param_groups[0]["lr"])
        zero = functools.partial(torch.zeros, (), device=self.device)
        self.loss_sum, self.counted = zero(), zero()  # loss x images and images over the finite steps
        self.correct, self.nonfinite, self.run, self.max_run = (zero(dtype=torch.long) for _ in range(4))
        self.seen = 0  # images of all steps (host count)

    METRICS = ("loss_sum", "counted", "correct", "nonfinite", "max_run")

    def reset_metrics(self) -> None:
        """Zero the sums, in place (a captured step adds into these tensors)."""
        for k in (*self.METRICS, "run"):
            getattr(self, k).zero_()
        self.seen = 0

    def set_lr(self, lr: float) -> None:
        """The lr of every param group; with cuda_graphs written into the device tensor they read."""
        if self._lr is not None:
            self._lr.fill_(float(lr))
            lr = self._lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def read_metrics(self) -> dict:
        """The sums so far as Python numbers (one host read; summed over ranks in a torchrun job)."""
        values = torch.stack([getattr(self, k).double() for k in self.METRICS])
        all_reduce_(values[:4], self.dist)  # max_run is the same on every rank (the skip flag is agreed)
        out = dict(zip(self.METRICS, values.tolist()))
        out["seen"] = self.seen * self.dist.world_size
        return out

    def load_metrics(self, values: dict) -> None:
        """Continue an interrupted epoch's sums (values from read_metrics, i.e. over all ranks: rank 0 carries them)."""
        keep = self.dist.is_main
        for k in self.METRICS:
            getattr(self, k).fill_(values[k] if keep or k == "max_run" else 0)
        self.run.zero_()
        self.seen = int(values["seen"]) // self.dist.world_size

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor,
                      weight_sum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mean logits [B, C]) under autocast; weight_sum: see `_weight_sum`."""
        share = {} if weight_sum is None else {"weight_sum": weight_sum}
        with autocast_context(self.device, self.amp):
            out = self.model(images)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images).logits
                loss = self._loss(out.expert_logits, labels, teacher_logits, **share)
            else:
                loss = self._loss(out.expert_logits, labels, **share)
        return loss, out.logits

    def _criterion(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.criterion(*args, **kwargs)

    def _weight_sum(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The divisor of the loss's class-weighted mean when one call sees part of the batch:
        sum_i w_{y_i} over the step's images on every rank, divided by the number of ranks (DDP
        averages the ranks' gradients). Each micro-batch divides by its images' share of it, so the
        parts add up to the weighted mean over the whole batch (docs/method.md §8). None when one
        call sees the whole batch, or when the loss weighs no class now (a plain mean splits exactly)."""
        if self.accumulate_steps == 1 and not self.dist.enabled:
            return None
        class_weight_sum = getattr(self.criterion, "class_weight_sum", None)
        total = class_weight_sum(labels) if class_weight_sum is not None else None
        if total is None:
            return None
        if self.dist.enabled:  # a fresh tensor: reduced in place
            all_reduce_(total, self.dist)
            total = total / self.dist.world_size
        return total

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the batch, as accumulate_steps micro-batches; (loss, mean logits), detached."""
        A = self.accumulate_steps
        weight_sum = self._weight_sum(labels)
        if A == 1:
            loss, logits = self.forward_loss(images, labels, weight_sum)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            return loss.detach().float(), logits.detach()
        n = labels.shape[0]
        parts = [(x, y) for x, y in zip(images.tensor_split(A), labels.tensor_split(A)) if y.shape[0]]  # a short last batch: fewer
        self.optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.model, "no_sync", None)  # DDP: all-reduce the gradients on the last micro-batch only
        loss_sum, all_logits = 0.0, []
        for i, (x, y) in enumerate(parts):
            weight = y.shape[0] / n  # 1 / accumulate_steps for equal micro-batches: the gradient of the batch mean
            with no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext():
                with scaled_before_backward(weight):  # the fused loss writes this share's gradient (ride_fast.ops.ride_loss_design)
                    loss, logits = self.forward_loss(x, y, None if weight_sum is None else weight_sum * weight)
                self.scaler.scale(loss * weight).backward()
            loss_sum = loss_sum + loss.detach().float() * weight
            all_logits.append(logits.detach())
        return loss_sum, torch.cat(all_logits)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run one step (one optimizer step, over accumulate_steps micro-batches); returns the (detached) loss, a device tensor."""
        if self.graphs is not None:
            loss = self.graphs(self._graph_key(images, labels), images, labels, owner=self.optimizer.state)
        else:
            loss = self._step(images, labels)
        self.seen += labels.shape[0]
        return loss

    def _graph_key(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Every Python value the step branches on: a captured graph replays only under the same key."""
        criterion = getattr(self.criterion, "graph_key", None)
        return (tuple(images.shape), images.stride(), images.dtype, tuple(labels.shape), labels.dtype,
                criterion() if criterion is not None else getattr(self.criterion, "epoch", None),
                self.model.training, None if self.teacher is None else self.teacher.training)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step's device work (what a CUDA graph captures): no host reads with the fused SGD or fp16."""
        self.buffers.snapshot()
        loss, logits = self._forward_backward(images, labels)
        bad = (~torch.isfinite(loss)).to(torch.int32)
        all_reduce_(bad, self.dist, op=ReduceOp.MAX)  # every rank skips the same steps
        self.buffers.restore_if(bad.bool())
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips steps with non-finite gradients by itself
        elif self.fused:
            self.optimizer.found_inf = bad.float()  # fused SGD skips the update on the device
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bad.item():  # host read: free on the CPU; on CUDA use the (default) fused SGD
            self.optimizer.step()
        self.scaler.update()
        n = labels.shape[0]
        ok = 1 - bad
        self.loss_sum += torch.where(ok.bool(), loss * n, 0.0)
        self.counted += ok * n
        self.correct += (logits.argmax(1) == labels).sum() * ok
        self.nonfinite += bad
        self.run.add_(1).mul_(bad)  # length of the current run of skipped steps
        torch.maximum(self.max_run, self.run, out=self.max_run)
        return loss


class BufferGuard:
    """Snapshot the BatchNorm running statistics of some modules before a step and put them back,
    on the device and bit for bit, when the step turns out to be skipped. A few kernels per step
    whatever the depth: the buffers of each dtype are concatenated into one snapshot, and restored
    with one torch.where and one foreach copy (no host read)."""

    def __init__(self, modules: list[nn.Module]):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for module in modules:
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                        groups.setdefault(b.dtype, []).append(b)
        self.groups = list(groups.values())
        self.saved: list[torch.Tensor] = []

    def _flat(self, group: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.reshape(-1) for b in group])

    def snapshot(self) -> None:
        self.saved = [self._flat(g) for g in self.groups]

    def restore_if(self, flag: torch.Tensor) -> None:
        for group, saved in zip(self.groups, self.saved):
            kept = torch.where(flag, saved, self._flat(group)).split([b.numel() for b in group])
            torch._foreach_copy_(group, [k.view_as(b) for k, b in zip(kept, group)])
        self.saved = []


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` lives on `device`; "cuda" without an index means the current CUDA device."""
    if t.device.type != device.type:
        return False
    if device.index is None and device.type == "cuda":
        return t.device.index == torch.cuda.current_device()
    return device.index is None or t.device.index == device.index


def prefetch_to_device(batches, device: torch.device, enabled: bool = True):
    """Yield the batches of `batches` on `device`. Batches already there pass through unchanged;
    host batches are pinned and copied with non_blocking=True, on CUDA on a side stream one batch
    ahead, so the copy of batch i+1 overlaps the step on batch i."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        for batch in batches:
            if not (on_device(batch.images, device) and on_device(batch.labels, device)):
                batch = Batch(batch.images.to(device), batch.labels.to(device))
            yield batch
        return
    stream = torch.cuda.Stream(device)

    def start(batch: Batch) -> Batch:
        if on_device(batch.images, device) and on_device(batch.labels, device):
            return batch
        with torch.cuda.stream(stream):
            images, labels = (t if t.is_pinned() else t.pin_memory() for t in (batch.images, batch.labels))
            return Batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    it = iter(batches)
    try:
        nxt = start(next(it))
    except StopIteration:
        return
    while nxt is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)  # the copy of this batch is done before the step reads it
        for t in (nxt.images, nxt.labels):
            t.record_stream(current)  # its memory is not reused by the side stream too early
        batch = nxt
        try:
            nxt = start(next(it))
        except StopIteration:
            nxt = None
        yield batch
