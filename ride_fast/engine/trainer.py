"""Stage-1 training and evaluation: one `Trainer` from a resolved `Config`.

Per step: forward of all experts, the loss over all experts' logits, backward, SGD. Metrics stay on
the device and are read once per `train.log_interval` steps and at the end of the epoch (the only
host syncs of the loop). Per epoch: the lr multiplier of the recipe, `loss.set_epoch` (the DRW /
temperature switch), evaluation, metrics as a JSON line, checkpoints written atomically.
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
from ride_fast.data import ArrayDataset, InMemoryLoader, build_datasets
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
from ride_fast.models import create_model


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


def autocast_context(device: torch.device, amp: str):
    """bf16 or fp16 autocast on any device type, or nothing."""
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

        self.model = create_model(
            cfg.model.name,
            num_classes=num_classes,
            num_experts=cfg.model.num_experts,
            reduce_dimension=cfg.model.reduce_dimension,
            use_norm=cfg.model.use_norm,
        ).to(self.device, memory_format=self.memory_format)
        self.criterion = build_loss(cfg.loss, self.class_counts, cfg.distill).to(self.device)
        self.teacher = self._load_teacher() if cfg.distill.teacher_checkpoint else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")

        self.train_loader = InMemoryLoader(
            train_set, cfg.data.batch_size, train=True, device=self.device, augment=cfg.data.augment,
            channels_last=cfg.model.channels_last, seed=cfg.train.seed,
        )
        self.test_loader = InMemoryLoader(
            test_set, cfg.data.eval_batch_size, train=False, device=self.device, channels_last=cfg.model.channels_last,
        )
        self.out_dir = Path(cfg.train.out_dir)
        self.epoch = 0  # last finished epoch
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ pieces of a step
    def _load_teacher(self) -> nn.Module:
        ckpt = load_checkpoint(self.cfg.distill.teacher_checkpoint)
        teacher = create_model(**ckpt["model_args"])
        teacher.load_state_dict(ckpt["model"])
        teacher.to(self.device, memory_format=self.memory_format)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # The original leaves the teacher's BatchNorm in training mode (spec §4); a switch turns it off.
        teacher.train(self.cfg.distill.teacher_bn_train)
        return teacher

    def _loss(self, images, labels):
        out = self.model(images)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images).logits
            loss = self.criterion(out.expert_logits, labels, teacher_logits)
        else:
            loss = self.criterion(out.expert_logits, labels)
        return loss, out.logits

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
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        steps = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        bar = _progress(steps, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress)
        start = time.perf_counter()
        for step, batch in enumerate(self.train_loader):
            if step >= steps:
                break
            with autocast_context(self.device, cfg.train.amp):
                loss, logits = self._loss(batch.images, batch.labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = batch.labels.shape[0]
            loss_sum += loss.detach() * n
            correct += (logits.argmax(1) == batch.labels).sum()
            seen += n
            if bar is not None:
                bar.update(1)
                if (step + 1) % cfg.train.log_interval == 0:  # the only host read inside the epoch
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}")
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
        for batch in self.test_loader:
            with autocast_context(self.device, self.cfg.train.amp):
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
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "config": config_to_dict(self.cfg),
            "model_args": dict(self.model.model_args),
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
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
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


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, checkpoint dict) from a ride_fast checkpoint, model in eval mode."""
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{path}: no 'model_args' entry; was it written by `ride-fast convert` or the trainer?")
    model = create_model(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
