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
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

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
from ride_fast.engine.metrics import SplitAccuracy, per_class_accuracy, split_accuracy
from ride_fast.engine.schedule import lr_multiplier
from ride_fast.losses import build_loss
from ride_fast.models import RIDENet, create_model
from ride_fast.models.batched import batched_state_dict, per_expert_state_dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles), where bf16 autocast is faster."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp with "auto" resolved: bf16 on CUDA devices that support it and on CPUs with AMX,
    otherwise "none" (fp32). Other values are returned unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "none"
    return "none"


def autocast_context(device: torch.device, amp: str):
    """bf16 or fp16 autocast on any device type, or nothing ("auto": see `resolve_amp`)."""
    amp = resolve_amp(amp, torch.device(device))
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum and Nesterov; fused kernels where available, else foreach."""
    kwargs = {}
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )


class TrainStep:
    """One stage-1 training step on a batch that is already on the device:

        forward (autocast) -> loss -> backward -> optimizer step -> on-device metric sums

    Nothing here reads the device from the host: the loss and the number of correct mean-logit
    predictions are summed into device tensors (`loss_sum`, `correct`), read by the caller once per
    log interval. (With train.amp=fp16 and a non-fused optimizer, GradScaler.step reads its inf
    check on the host; fused SGD, the CUDA default, takes the scale on the device.)

    compile: torch.compile of forward + loss (+ teacher); cuda_graphs: the same with mode
    "reduce-overhead", i.e. CUDA graphs replayed per step (static shapes; CUDA only).
    compile_loss: whether the loss goes into the compiled graph; None (auto): yes, except the fused
    Triton loss on CUDA (already one kernel; it runs eagerly between the compiled parts).
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
    ) -> None:
        self.model, self.criterion, self.optimizer, self.teacher = model, criterion, optimizer, teacher
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"train.cuda_graphs=true needs a CUDA device, the run is on {self.device}; set train.cuda_graphs=false")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
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

    def reset_metrics(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

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
        loss, logits = self.forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = labels.shape[0]
        loss = loss.detach()
        self.loss_sum += loss * n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += n
        return loss


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


class Trainer:
    """Builds data, model, loss and optimizer from `cfg`, then trains with `fit()`."""

    def __init__(
        self,
        cfg: Config,
        *,
        train_set: ArrayDataset | None = None,
        test_set: ArrayDataset | None = None,
        log: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.log = log
        self.device = resolve_device(cfg.train.device)
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
        self.criterion = build_loss(cfg.loss, self.class_counts, cfg.distill).to(self.device)
        self.teacher = self._load_teacher() if cfg.distill.teacher_checkpoint else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.step = TrainStep(self.model, self.criterion, self.optimizer, device=self.device, amp=self.amp, teacher=self.teacher,
                              compile=cfg.train.compile, cuda_graphs=cfg.train.cuda_graphs)
        self.scaler = self.step.scaler

        # in-memory sets (MNIST/CIFAR) stay on the device; file lists go through DALI or the torch loader
        self.train_loader, self.test_loader = build_loaders(
            cfg.data, train_set, test_set, self.device, channels_last=cfg.model.channels_last, seed=cfg.train.seed,
        )
        self.out_dir = Path(cfg.train.out_dir)
        self.epoch = 0  # last finished epoch
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.history: list[dict] = []

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

    def train_epoch(self, epoch: int) -> EpochResult:
        cfg = self.cfg
        lr = self.set_epoch_lr(epoch)
        self.criterion.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        self.model.train()
        step_fn = self.step
        step_fn.reset_metrics()
        steps = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress)
        start = time.perf_counter()
        for step, batch in enumerate(prefetch_to_device(self.train_loader, self.device, cfg.train.prefetch)):
            if step >= steps:
                break
            step_fn(batch.images, batch.labels)
            if bar is not None:
                bar.update(1)
                if (step + 1) % cfg.train.log_interval == 0:  # the only host read inside the epoch
                    bar.set_postfix(loss=f"{float(step_fn.loss_sum) / step_fn.seen:.3f}")
        loss_sum, correct, seen = step_fn.loss_sum, step_fn.correct, step_fn.seen
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        mean_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"epoch {epoch}: the training loss is {mean_loss}; lower optim.lr or use train.amp=none/bf16")
        return EpochResult(epoch, lr, mean_loss, 100.0 * float(correct) / max(seen, 1), seconds, seen / max(seconds, 1e-9))

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> SplitAccuracy:
        """Accuracy of the mean logits of all experts on the test set, overall and per split."""
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
        return split_accuracy(correct, total, self.class_counts)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dump_config(cfg), self.out_dir / "config.yaml")
        metrics_path = self.out_dir / "metrics.jsonl"
        for epoch in range(self.epoch + 1, cfg.train.epochs + 1):
            result = self.train_epoch(epoch)
            record = {"epoch": epoch, "lr": result.lr, "loss": result.loss, "train_acc": result.train_acc,
                      "seconds": result.seconds, "images_per_s": result.images_per_s}
            is_best = False
            if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
                acc = self.evaluate()
                record["test"] = acc.as_dict()
                metric = acc.overall if cfg.train.select_best_on == "overall" else epoch
                is_best = metric > self.best_metric
                if is_best:
                    self.best_metric, self.best_epoch = metric, epoch
                self.log(
                    f"epoch {epoch:3d}  lr {result.lr:.4f}  loss {result.loss:.4f}  "
                    f"test {acc.overall:5.1f} (many {acc.many:5.1f} med {acc.medium:5.1f} few {acc.few:5.1f})  "
                    f"{result.images_per_s:,.0f} img/s"
                )
            self.epoch = epoch
            self.history.append(record)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.save(is_best)
        return {"best_epoch": self.best_epoch, "best_metric": self.best_metric, "history": self.history}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The checkpoint: model and optimizer state in the per-expert layout (see module docstring)."""
        model_state = self.model.state_dict()
        if self.model.batched:
            model_state = per_expert_state_dict(model_state, self.model.num_experts)
        return {
            "model": model_state,
            "optimizer": canonical_optimizer_state(self.optimizer, self.model),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "config": config_to_dict(self.cfg),
            "model_args": {k: v for k, v in self.model.model_args.items() if k != "batched"},  # per-expert layout
            "class_counts": [int(c) for c in self.class_counts],
            "rng": rng_state(),
        }

    def save(self, is_best: bool) -> None:
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
                break
            else:
                raise
        self.model.load_state_dict(ckpt["model"])  # either layout
        load_canonical_optimizer_state(self.optimizer, self.model, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.best_metric = float(ckpt["best_metric"])
        self.best_epoch = int(ckpt["best_epoch"])
        set_rng_state(ckpt["rng"])
        self.log(f"resumed from {path} at epoch {self.epoch}")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", batched: bool | None = None):
    """(model, checkpoint dict) from a ride_fast checkpoint, model in eval mode. batched: build a
    BatchedRIDENet (True) or the per-expert network (False); None: as the checkpoint's model_args say."""
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{path}: no 'model_args' entry; was it written by `ride-fast convert` or the trainer?")
    args = dict(ckpt["model_args"]) if batched is None else {**ckpt["model_args"], "batched": batched}
    model = create_model(**args)
    model.load_state_dict(ckpt["model"])  # either layout
    return model.to(device).eval(), ckpt
