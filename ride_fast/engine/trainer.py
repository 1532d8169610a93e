"""Stage-1 training and evaluation: one `Trainer` from a resolved `Config`.

Per step (`TrainStep`): forward of all experts, the loss over all experts' logits, backward, SGD.
Metrics stay on the device and are read once per `train.log_interval` steps and at the end of the
epoch (the only host syncs of the loop). Per epoch: the lr multiplier of the recipe,
`loss.set_epoch` (the DRW / temperature switch), evaluation, metrics as a JSON line, checkpoints
written atomically.

The fast path, one config key per switch; the defaults are the fastest correct setting per device:

    model.batched         experts as one grouped network (BatchedRIDENet)          default on
    model.channels_last   NHWC activations and weights (oneDNN / cuDNN)            default on
    train.amp             auto: bf16 autocast on CUDA and on CPUs with AMX, else fp32
    optim.implementation  auto: fused SGD on CUDA, foreach on the CPU
    loss.impl             auto: the fused Triton RIDE loss on CUDA, analytic backward on the CPU
    train.prefetch        host batches copied one step ahead (pinned, non_blocking, side stream)
    train.cudnn_benchmark cuDNN autotuning (CUDA, not with train.deterministic)
    train.compile         torch.compile of forward + loss (off: minutes of compile time)
    train.cuda_graphs     torch.compile mode "reduce-overhead" (CUDA graphs; CUDA only, off)

Checkpoints hold the network in the per-expert layout with model_args that rebuild it, whatever
model.batched was, and the optimizer state in the same canonical parameter order, so a checkpoint
resumes, evaluates or routes with either layout (see `canonical_optimizer_state`).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed import ReduceOp

from ride_fast.config import Config, config_to_dict, dump_config
from ride_fast.data import ArrayDataset, build_datasets, build_loaders
from ride_fast.data.dataset import Batch
from ride_fast.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from ride_fast.engine.distributed import (
    DistContext,
    all_reduce_,
    convert_sync_batchnorm,
    init_distributed,
    wrap_ddp,
)
from ride_fast.engine.runtime import autocast_context, resolve_amp, resolve_device, seed_everything
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.schedule import lr_multiplier
from ride_fast.io import pyplot, save_figure
from ride_fast.losses import build_loss
from ride_fast.models import RIDENet, create_model
from ride_fast.models.batched import batched_state_dict, per_expert_state_dict


def fused_sgd_supported(device: torch.device) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and Nesterov; one fused kernel per step where torch has it (CUDA and the
    CPU: about 5x faster than foreach on the CPU), else foreach.

    The momentum buffers start as zeros instead of being created by the first step. The result is
    the same (momentum * 0 + grad = grad) and it keeps a skipped first step harmless: fused SGD given
    `found_inf` (the non-finite-loss guard, GradScaler) would otherwise leave uninitialised buffers.
    """
    kwargs = {}
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if fused_sgd_supported(device) else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )
    if cfg.momentum:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


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

    compile: torch.compile of forward + loss (+ teacher); cuda_graphs: the same with mode
    "reduce-overhead", i.e. CUDA graphs replayed per step (static shapes; CUDA only).
    compile_loss: whether the loss goes into the compiled graph; None (auto): yes, except the fused
    Triton loss on CUDA (already one kernel; it runs eagerly between the compiled parts).
    dist: the DistContext of a torchrun job (the model is then DDP-wrapped by the caller).
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
        compile_loss: bool | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.model, self.criterion, self.optimizer, self.teacher = model, criterion, optimizer, teacher
        self.device = torch.device(device)
        self.dist = dist or DistContext()
        self.amp = resolve_amp(amp, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graphs=true needs a CUDA device, the run is on {self.device}; set train.cuda_graphs=false")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.fused = bool(optimizer.defaults.get("fused"))
        self.buffers = BufferGuard([model] + ([teacher] if teacher is not None else []))
        self.cuda_graphs = cuda_graphs
        self.forward_loss = self._forward_loss
        self._loss = self._criterion
        if compile or cuda_graphs:
            if compile_loss is None:
                compile_loss = not (self.device.type == "cuda" and getattr(criterion, "impl", "auto") in ("auto", "triton"))
            if not compile_loss:
                self._loss = torch.compiler.disable(self._criterion)
            self.forward_loss = torch.compile(self._forward_loss, mode="reduce-overhead" if cuda_graphs else None)
        self.reset_metrics()

    METRICS = ("loss_sum", "counted", "correct", "nonfinite", "max_run")

    def reset_metrics(self) -> None:
        def zero(dtype=torch.float32):
            return torch.zeros((), device=self.device, dtype=dtype)

        self.loss_sum, self.counted = zero(), zero()  # loss x images and images over the finite steps
        self.correct, self.nonfinite, self.run, self.max_run = (zero(torch.long) for _ in range(4))
        self.seen = 0  # images of all steps (host count)

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

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mean logits [B, C]) under autocast."""
        with autocast_context(self.device, self.amp):
            out = self.model(images)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images).logits
                loss = self._loss(out.expert_logits, labels, teacher_logits)
            else:
                loss = self._loss(out.expert_logits, labels)
        return loss, out.logits

    def _criterion(self, *args: torch.Tensor) -> torch.Tensor:
        return self.criterion(*args)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run one step; returns the (detached) loss, a device tensor."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay may be overwritten now
        self.buffers.snapshot()
        loss, logits = self.forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        loss = loss.detach().float()
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
        self.correct += (logits.detach().argmax(1) == labels).sum() * ok
        self.nonfinite += bad
        self.run.add_(1).mul_(bad)  # length of the current run of skipped steps
        torch.maximum(self.max_run, self.run, out=self.max_run)
        self.seen += n
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


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _per_expert_param_names(model: RIDENet) -> list[str]:
    """The parameter order of the per-expert layout of `model` (built on the meta device)."""
    if not getattr(model, "batched", False):
        return _param_names(model)
    args = {k: v for k, v in model.model_args.items() if k != "batched"}
    with torch.device("meta"):
        per = create_model(**args)
    return _param_names(per)


def _convert_optimizer_state(state: dict, src_names: list[str], dst_names: list[str], convert) -> dict:
    """Re-key an optimizer state dict (one param group over all parameters) from one parameter
    order to another, converting per-parameter tensors (momentum buffers) with `convert`, a state
    dict converter (batched_state_dict / per_expert_state_dict / identity)."""
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(src_names):
        raise CheckpointError(f"cannot convert an optimizer state with {len(groups)} param groups over "
                              f"{sum(len(g['params']) for g in groups)} parameters (expected one group of {len(src_names)})")
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            fields.setdefault(key, {})[src_names[int(idx)]] = value
    position = {n: i for i, n in enumerate(dst_names)}
    new_state: dict[int, dict] = {}
    for key, by_name in fields.items():
        for name, value in convert(by_name).items():
            new_state.setdefault(position[name], {})[key] = value
    group = dict(groups[0], params=list(range(len(dst_names))))
    return {"state": new_state, "param_groups": [group]}


def canonical_optimizer_state(optimizer: torch.optim.Optimizer, model: RIDENet) -> dict:
    """optimizer.state_dict() in the parameter order and shapes of the per-expert layout."""
    state = optimizer.state_dict()
    if not getattr(model, "batched", False):
        return state
    E = model.num_experts
    return _convert_optimizer_state(state, _param_names(model), _per_expert_param_names(model), lambda d: per_expert_state_dict(d, E))


def load_canonical_optimizer_state(optimizer: torch.optim.Optimizer, model: RIDENet, state: dict) -> None:
    """The inverse of canonical_optimizer_state: load a per-expert-layout optimizer state."""
    if getattr(model, "batched", False):
        E = model.num_experts
        state = _convert_optimizer_state(state, _per_expert_param_names(model), _param_names(model), lambda d: batched_state_dict(d, E))
    optimizer.load_state_dict(state)


@dataclass
class EpochResult:
    epoch: int
    lr: float
    loss: float
    train_acc: float
    seconds: float
    images_per_s: float
    data_wait: float = 0.0  # seconds the loop waited for the loader
    nonfinite: int = 0  # steps skipped for a non-finite loss
    steps: int = 0  # steps done in this epoch so far
    interrupted: bool = False  # stopped by SIGTERM / SIGINT before the end of the epoch
    sums: dict = field(default_factory=dict)  # TrainStep.read_metrics() at the end (kept by a mid-epoch checkpoint)


class StopRequest:
    """SIGTERM / SIGINT set a flag that the training loop reads at the next step boundary, so the
    run saves a checkpoint and exits cleanly (a scheduler's pre-emption, Ctrl-C). A second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = print):
        self.requested: str | None = None
        self.log = log
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: saving a checkpoint at the next step boundary, then exiting (Ctrl-C again aborts)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Trainer:
    """Builds data, model, loss and optimizer from `cfg`, then trains with `fit()`.

    Under torchrun (WORLD_SIZE > 1) every process builds a Trainer: it joins the process group,
    trains a DDP-wrapped model on its shard of each global batch, evaluates its shard of the test
    set (per-class counts summed over ranks: every test image counted once), and only rank 0 logs
    and writes files.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        train_set: ArrayDataset | None = None,
        test_set: ArrayDataset | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device))
        self.log = log if self.dist.is_main else (lambda s: None)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        if train_set is None or test_set is None:
            train_set, test_set = build_datasets(cfg.data)
        self.train_set, self.test_set = train_set, test_set
        self.class_counts = train_set.class_counts()
        empty = np.flatnonzero(self.class_counts == 0)
        if len(empty):
            raise ValueError(f"{train_set.name}: classes {empty.tolist()[:10]} have no training image; every class needs at least one")
        num_classes = train_set.num_classes
        if cfg.model.num_classes and cfg.model.num_classes != num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data set {train_set.name} has {num_classes} classes")
        self.num_classes = num_classes
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        self.amp = resolve_amp(cfg.train.amp, self.device)

        self.model = create_model(
            cfg.model.name,
            num_classes=num_classes,
            num_experts=cfg.model.num_experts,
            reduce_dimension=cfg.model.reduce_dimension,
            use_norm=cfg.model.use_norm,
            batched=cfg.model.batched,
        ).to(self.device, memory_format=self.memory_format)
        if cfg.train.sync_bn and self.dist.enabled:
            self.model = convert_sync_batchnorm(self.model, self.device)
        self.train_model = wrap_ddp(self.model, self.dist, self.device)  # self.model: the module that is saved
        self.criterion = build_loss(cfg.loss, self.class_counts, cfg.distill).to(self.device)
        self.teacher = self._load_teacher() if cfg.distill.teacher_checkpoint else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.step = TrainStep(self.train_model, self.criterion, self.optimizer, device=self.device, amp=self.amp,
                              teacher=self.teacher, compile=cfg.train.compile, cuda_graphs=cfg.train.cuda_graphs, dist=self.dist)
        self.scaler = self.step.scaler

        # in-memory sets (MNIST/CIFAR) stay on the device; file lists go through DALI or the torch loader
        self.train_loader, self.test_loader = build_loaders(
            cfg.data, train_set, test_set, self.device, channels_last=cfg.model.channels_last, seed=cfg.train.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.out_dir = Path(cfg.train.out_dir)
        self.epoch = 0  # last finished epoch
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.history: list[dict] = []
        self.last_eval: SplitAccuracy | None = None
        self._resume_step = 0  # > 0: the checkpoint was written inside epoch self.epoch + 1
        self._resume_sums: dict = {}
        self._stop: StopRequest | None = None
        self._tb = None

    # ------------------------------------------------------------------ pieces of a step
    def _load_teacher(self) -> nn.Module:
        ckpt = load_checkpoint(self.cfg.distill.teacher_checkpoint)
        teacher = create_model(**{**ckpt["model_args"], "batched": self.cfg.model.batched})
        teacher.load_state_dict(ckpt["model"])  # either layout
        teacher.to(self.device, memory_format=self.memory_format)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # The original leaves the teacher's BatchNorm in training mode (spec §4); a switch turns it off.
        teacher.train(self.cfg.distill.teacher_bn_train)
        return teacher

    def set_epoch_lr(self, epoch: int) -> float:
        o = self.cfg.optim
        lr = o.lr * lr_multiplier(epoch, o.warmup_epochs, o.milestones, o.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _stop_requested(self, agree: bool) -> bool:
        """Whether a signal asked to stop; agree=True: decided together by all ranks (a collective)."""
        local = self._stop is not None and self._stop.requested is not None
        if not (agree and self.dist.enabled):
            return local
        flag = torch.tensor([int(local)], device=self.device)
        return bool(all_reduce_(flag, self.dist, op=ReduceOp.MAX).item())

    def _check_nonfinite(self, sums: dict, epoch: int, step: int) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        if limit and sums["max_run"] >= limit:
            raise FloatingPointError(
                f"epoch {epoch}, step {step}: {int(sums['max_run'])} training steps in a row had a non-finite loss and were "
                f"skipped (train.max_nonfinite_steps={limit}); checkpoints up to the last epoch are in {self.out_dir}. "
                "Lower optim.lr, use train.amp=bf16 or none, or check the data")

    def train_epoch(self, epoch: int) -> EpochResult:
        """Train one epoch (or its rest, after a mid-epoch resume); stops early at a step boundary
        when a signal asked to (then `interrupted` is set). In a torchrun job, ranks agree on
        stopping at log intervals (train.log_interval), a single process after any step."""
        cfg = self.cfg
        lr = self.set_epoch_lr(epoch)
        self.criterion.set_epoch(epoch)
        start, self._resume_step = self._resume_step, 0
        discard = _seek(self.train_loader, epoch, start)
        self.train_model.train()
        step_fn = self.step
        step_fn.reset_metrics()
        carried = self._resume_sums.pop("seconds", 0.0), self._resume_sums.pop("data_wait", 0.0)
        if start:
            step_fn.load_metrics(self._resume_sums)
        self._resume_sums = {}
        steps = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress and self.dist.is_main, initial=start)
        began = time.perf_counter()
        data_wait = 0.0
        batches = prefetch_to_device(self.train_loader, self.device, cfg.train.prefetch)
        for _ in range(discard):  # a loader that cannot start mid-epoch: skip the batches done
            next(batches)
        done, interrupted = start, False
        while done < steps:
            t = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t
            if batch is None:
                break
            step_fn(batch.images, batch.labels)
            done += 1
            if bar is not None:
                bar.update(1)
            if done % cfg.train.log_interval == 0:  # the only host reads inside the epoch
                sums = step_fn.read_metrics()
                self._check_nonfinite(sums, epoch, done)
                if bar is not None:
                    bar.set_postfix(loss=f"{sums['loss_sum'] / max(sums['counted'], 1):.3f}")
                if done < steps and self._stop_requested(agree=True):
                    interrupted = True
                    break
            elif not self.dist.enabled and done < steps and self._stop_requested(agree=False):
                interrupted = True
                break
        batches.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began + carried[0]
        data_wait += carried[1]
        if bar is not None:
            bar.close()
        sums = step_fn.read_metrics()
        self._check_nonfinite(sums, epoch, done)
        counted = max(sums["counted"], 1)
        mean_loss = sums["loss_sum"] / counted
        return EpochResult(epoch, lr, mean_loss, 100.0 * sums["correct"] / counted, seconds, sums["seen"] / max(seconds, 1e-9),
                           data_wait=data_wait, nonfinite=int(sums["nonfinite"]), steps=done, interrupted=interrupted,
                           sums={**sums, "seconds": seconds, "data_wait": data_wait})

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> SplitAccuracy:
        """Accuracy of the mean logits of all experts on the test set, overall and per split (in a
        torchrun job each rank evaluates its shard and the per-class counts are summed)."""
        model = model or self.model
        model.eval()
        correct = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        total = torch.zeros_like(correct)
        for batch in prefetch_to_device(self.test_loader, self.device, self.cfg.train.prefetch):
            with autocast_context(self.device, self.amp):
                logits = model(batch.images).logits
            c, t = per_class_accuracy(logits.argmax(1), batch.labels, self.num_classes)
            correct += c
            total += t
        all_reduce_(correct, self.dist)
        all_reduce_(total, self.dist)
        return split_accuracy(correct, total, self.class_counts)

    def _average_bn_statistics(self) -> None:
        """Per-rank BatchNorm running statistics -> their mean over ranks, so that every rank
        evaluates, and rank 0 saves, the same network (a no-op in one process; with sync_bn they
        are equal already)."""
        if not self.dist.enabled or self.cfg.train.sync_bn:
            return
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var):
                    all_reduce_(buf, self.dist).div_(self.dist.world_size)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to train.epochs; returns best_epoch, best_metric, history and `interrupted`
        (the run stopped on a signal after saving; `ride-fast train --resume auto` continues it)."""
        cfg = self.cfg
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dump_config(cfg), self.out_dir / "config.yaml")
            self._tb = _tensorboard_writer(self.out_dir, cfg.train.tensorboard)
        interrupted = False
        stop = StopRequest(self.log) if cfg.train.handle_signals else contextlib.nullcontext()
        try:
            with stop:
                self._stop = stop if isinstance(stop, StopRequest) else None
                interrupted = self._fit_epochs()
        finally:
            self._stop = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        if not interrupted and self.dist.is_main and self.last_eval is not None:
            self._write_final_report()
        return {"best_epoch": self.best_epoch, "best_metric": self.best_metric, "history": self.history, "interrupted": interrupted}

    def _fit_epochs(self) -> bool:
        cfg = self.cfg
        for epoch in range(self.epoch + 1, cfg.train.epochs + 1):
            result = self.train_epoch(epoch)
            if result.interrupted:
                self.save_mid_epoch(epoch, result)
                self.log(f"stopped by {self._stop.requested} in epoch {epoch} after step {result.steps}; "
                         f"{self.out_dir / 'last.pt'} holds it: `ride-fast train ... --resume auto` continues")
                return True
            self._average_bn_statistics()
            record = {"epoch": epoch, "lr": result.lr, "loss": result.loss, "train_acc": result.train_acc,
                      "seconds": result.seconds, "images_per_s": result.images_per_s, "data_wait_s": result.data_wait,
                      "nonfinite_steps": result.nonfinite}
            is_best = False
            if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
                acc = self.evaluate()
                self.last_eval = acc
                record["test"] = acc.as_dict()
                metric = acc.overall if cfg.train.select_best_on == "overall" else epoch
                is_best = metric > self.best_metric
                if is_best:
                    self.best_metric, self.best_epoch = metric, epoch
                self.log(
                    f"epoch {epoch:3d}  lr {result.lr:.4f}  loss {result.loss:.4f}  "
                    f"test {acc.overall:5.1f} (many {acc.many:5.1f} med {acc.medium:5.1f} few {acc.few:5.1f})  "
                    f"{result.images_per_s:,.0f} img/s  data wait {result.data_wait:.1f}/{result.seconds:.1f} s"
                )
            if result.nonfinite:
                self.log(f"warning: epoch {epoch} skipped {result.nonfinite} steps with a non-finite loss")
            self.epoch = epoch
            self.history.append(record)
            if self.dist.is_main:
                with open(self.out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                _tensorboard_log(self._tb, record)
                self.save(is_best)
            if epoch < cfg.train.epochs and self._stop_requested(agree=True):  # a signal during evaluation / saving
                self.log(f"stopped by {self._stop.requested} after epoch {epoch}; `ride-fast train ... --resume auto` continues")
                return True
        return False

    def _write_final_report(self) -> None:
        """per_class_accuracy.json and .png: the last evaluation's accuracy of each class against its
        number of training images, the long-tail picture of the run."""
        acc = self.last_eval
        counts = [int(c) for c in self.class_counts]
        atomic_write_text(json.dumps({"epoch": self.epoch, "test": acc.as_dict(), "class_counts": counts,
                                      "per_class_accuracy": acc.per_class}, indent=1), self.out_dir / "per_class_accuracy.json")
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        per_class = np.asarray(acc.per_class, dtype=np.float64)
        ax.scatter(counts, per_class, s=12, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.set_title(f"epoch {self.epoch}: overall {acc.overall:.1f}, many {acc.many:.1f}, medium {acc.medium:.1f}, few {acc.few:.1f}",
                     fontsize=9)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        save_figure(fig, self.out_dir / "per_class_accuracy.png")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The checkpoint: model and optimizer state in the per-expert layout (see module docstring).

        "step" > 0 marks a checkpoint written inside epoch epoch + 1 after that many steps, with the
        epoch's metric sums so far ("epoch_sums"). "loader" is the training loader's position: every
        random draw of the loaders derives from (seed, epoch, rank, position), so the position is
        all of a loader's RNG state.
        """
        model_state = self.model.state_dict()
        if self.model.batched:
            model_state = per_expert_state_dict(model_state, self.model.num_experts)
        return {
            "model": model_state,
            "optimizer": canonical_optimizer_state(self.optimizer, self.model),
            "scaler": self.scaler.state_dict(),
            # the lr schedule is a function of the epoch (engine/schedule.py): its state is the epoch and this lr
            "scheduler": {"lr": float(self.optimizer.param_groups[0]["lr"]), "epoch": self.epoch},
            "epoch": self.epoch,
            "step": 0,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "config": config_to_dict(self.cfg),
            "model_args": {k: v for k, v in self.model.model_args.items() if k != "batched"},  # per-expert layout
            "class_counts": [int(c) for c in self.class_counts],
            "rng": rng_state(),
            "loader": {"seed": self.cfg.train.seed, "epoch": self.epoch + 1, "batch": 0, "world_size": self.dist.world_size},
        }

    def save(self, is_best: bool) -> None:
        """At the end of an epoch: epoch_NNNN.pt (the last train.keep_last kept), last.pt, and best.pt
        when the epoch is the best so far. Every file is written atomically; rank 0 only."""
        if not self.dist.is_main:
            return
        state = self.state_dict()
        path = atomic_save(state, self.out_dir / f"epoch_{self.epoch:04d}.pt")
        atomic_save(state, self.out_dir / "last.pt")
        if is_best:
            atomic_save(state, self.out_dir / "best.pt")
        keep = self.cfg.train.keep_last
        old = sorted(self.out_dir.glob("epoch_*.pt"))[:-keep] if keep > 0 else []
        for p in old:
            if p != path:
                p.unlink(missing_ok=True)

    def save_mid_epoch(self, epoch: int, result: EpochResult) -> None:
        """last.pt inside `epoch`, after result.steps steps (on a signal). epoch_NNNN.pt and best.pt
        stay as they were: a resume falls back to them if this file is damaged."""
        self._average_bn_statistics()
        if not self.dist.is_main:
            return
        state = self.state_dict()
        state.update(step=result.steps, epoch_sums=result.sums, loader=dict(state["loader"], batch=result.steps))
        atomic_save(state, self.out_dir / "last.pt")

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint; a corrupt file falls back to the newest readable one beside it."""
        path = Path(path)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            candidates = sorted(path.parent.glob("epoch_*.pt"), reverse=True)
            for alt in candidates:
                try:
                    ckpt = load_checkpoint(alt)
                except CheckpointError:
                    continue
                self.log(f"warning: {err}; resuming from {alt} instead")
                path = alt
                break
            else:
                raise
        self.model.load_state_dict(ckpt["model"])  # either layout
        load_canonical_optimizer_state(self.optimizer, self.model, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.best_metric = float(ckpt["best_metric"])
        self.best_epoch = int(ckpt["best_epoch"])
        self._resume_step = int(ckpt.get("step", 0))
        self._resume_sums = dict(ckpt.get("epoch_sums", {}))
        set_rng_state(ckpt["rng"])
        where = f"epoch {self.epoch + 1} step {self._resume_step}" if self._resume_step else f"the end of epoch {self.epoch}"
        self.log(f"resumed from {path} at {where}")


def _seek(loader, epoch: int, start_batch: int) -> int:
    """Set the loader to `epoch`, starting at batch `start_batch`; returns how many batches the caller
    must still discard (loaders that cannot start mid-epoch: `seekable` false or absent)."""
    if start_batch and getattr(loader, "seekable", False):
        loader.set_epoch(epoch, start_batch=start_batch)
        return 0
    loader.set_epoch(epoch)
    return start_batch


def _tensorboard_writer(out_dir: Path, enabled: bool):
    """A SummaryWriter under OUT_DIR/tensorboard when asked for and the tensorboard package is installed."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the tensorboard package
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _tensorboard_log(writer, record: dict) -> None:
    if writer is None:
        return
    step = record["epoch"]
    for key in ("lr", "loss", "train_acc", "images_per_s", "data_wait_s", "nonfinite_steps"):
        writer.add_scalar(f"train/{key}", record[key], step)
    for key, value in record.get("test", {}).items():
        writer.add_scalar(f"test/{key}", value, step)
    writer.flush()


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
