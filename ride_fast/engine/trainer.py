"""Stage-1 training and evaluation: one `Trainer` from a resolved `Config`.

Per step (`TrainStep`): forward of all experts, the loss over all experts' logits, backward, SGD
(with train.accumulate_steps = K: forward and backward over K micro-batches, then the one SGD step).
Metrics stay on the device and are read once per `train.log_interval` steps and at the end of the
epoch (the only host syncs of the loop). First: a new run claims train.out_dir (run_folder.py:
another run's files stop it unless --overwrite), logs its start-up summary and opens train.log
(rank 0). Per epoch: the lr multiplier of the recipe,
`loss.set_epoch` (the DRW / temperature switch), evaluation, metrics as a JSON line, checkpoints
written atomically.

The fast path, one config key per switch; the defaults are the fastest correct setting per device:

    model.batched         experts as one grouped network (BatchedRIDENet)          default on
    model.channels_last   NHWC activations and weights (oneDNN / cuDNN)            default on
    train.amp             auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32
    optim.implementation  auto: fused SGD where torch has it (CUDA and the CPU), else foreach
    loss.impl             auto: the fused Triton RIDE loss on CUDA, analytic backward on the CPU
    train.prefetch        host batches copied one step ahead (pinned, non_blocking, side stream)
    train.cudnn_benchmark cuDNN autotuning (CUDA, not with train.deterministic)
    train.compile         torch.compile of forward + loss (off: minutes of compile time)
    train.cuda_graphs     the whole step, forward to SGD update, replayed as one CUDA graph (CUDA only, off)

Checkpoints hold the network in the per-expert layout with model_args that rebuild it, whatever
model.batched was, and the optimizer state in the same canonical parameter order, so a checkpoint
resumes, evaluates or routes with either layout (engine/optim.py, engine/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed import ReduceOp

from ride_fast.config import Config, config_to_dict, dump_config
from ride_fast.data import ArrayDataset, build_datasets, build_loaders, choose_loader
from ride_fast.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    network_from_checkpoint,
    resume_changes,
    rng_state,
    set_rng_state,
)
from ride_fast.engine.distributed import (
    all_reduce_,
    average_bn_statistics,
    convert_sync_batchnorm,
    init_distributed,
    wrap_ddp,
)
from ride_fast.engine.evaluate import evaluate_model, write_per_class_report
from ride_fast.engine.metrics import SplitAccuracy, pct
from ride_fast.engine.monitor import (
    LOGGER,
    SIGNAL_AT_ENV,
    StopRequest,
    held_records,
    info,
    log_file,
    progress_bar,
    signal_at_from_env,
    startup_summary,
    tensorboard_log,
    tensorboard_writer,
    warn,
)
from ride_fast.engine.optim import build_optimizer, canonical_optimizer_state, load_canonical_optimizer_state
from ride_fast.engine.run_folder import UNSAVED_RUN_FILES, claim_run_folder, run_files
from ride_fast.engine.runtime import resolve_amp, resolve_device, seed_everything, synchronize
from ride_fast.engine.schedule import lr_multiplier
from ride_fast.engine.step import TrainStep, prefetch_to_device
from ride_fast.engine.step_graph import CudaGraphBackend
from ride_fast.io import json_text, plural
from ride_fast.losses import build_loss, loss_path
from ride_fast.models import create_model
from ride_fast.models.layout import per_expert_state_dict


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



class Trainer:
    """Builds data, model, loss and optimizer from `cfg`, then trains with `fit()`.

    Under torchrun (one process or many) every process builds a Trainer: it joins the process group,
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
        log: Callable[[str], None] = info,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.overwrite = overwrite  # a new run may replace another run's files in train.out_dir (`--overwrite`)
        self._owns_out_dir = False  # True after resume() or the first fit(): train.out_dir holds this run
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
        # train.cuda_graphs under torchrun: DDP is built on the stream its step is captured on (PyTorch's CUDA-graph notes)
        graph_backend = CudaGraphBackend(self.device) if cfg.train.cuda_graphs else None
        with graph_backend.warmup() if graph_backend is not None else contextlib.nullcontext():
            self.train_model = wrap_ddp(self.model, self.dist, self.device)  # self.model: the module that is saved
        self.criterion = build_loss(cfg.loss, self.class_counts, cfg.distill).to(self.device)
        # which loss implementation runs ("triton", "analytic", "reference"), asked of the ops dispatch
        self.loss_path = loss_path(self.criterion, self.device, cfg.model.num_experts, num_classes)
        self.teacher = self._load_teacher() if cfg.distill.teacher_checkpoint else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.step = TrainStep(self.train_model, self.criterion, self.optimizer, device=self.device, amp=self.amp,
                              teacher=self.teacher, compile=cfg.train.compile, cuda_graphs=cfg.train.cuda_graphs, dist=self.dist,
                              accumulate_steps=cfg.train.accumulate_steps, graph_backend=graph_backend)
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
        self.best_eval: SplitAccuracy | None = None  # the evaluation of best_epoch (best.pt), for per_class_accuracy.*
        self._resume_step = 0  # > 0: the checkpoint was written inside epoch self.epoch + 1
        self._resume_sums: dict = {}
        self._resumed: dict | None = None  # after resume(): {"from", "at", "changes" [(key, old, new)]}
        self._resume_records: list = []  # resume()'s messages, written to train.log when fit() opens it
        self._stop: StopRequest | None = None
        self._tb = None
        self._signal_at = signal_at_from_env()  # a test hook, None unless RIDE_FAST_SIGNAL_AT is set (engine/monitor.py)

    # ------------------------------------------------------------------ pieces of a step
    def _load_teacher(self) -> nn.Module:
        path = self.cfg.distill.teacher_checkpoint
        teacher = network_from_checkpoint(load_checkpoint(path), path, device=self.device, batched=self.cfg.model.batched,
                                          channels_last=self.cfg.model.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # The original leaves the teacher's BatchNorm in training mode (docs/method.md §4); a switch turns it off.
        teacher.train(self.cfg.distill.teacher_bn_train)
        return teacher

    def set_epoch_lr(self, epoch: int) -> float:
        o = self.cfg.optim
        lr = o.lr * lr_multiplier(epoch, o.warmup_epochs, o.milestones, o.gamma)
        self.step.set_lr(lr)
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
        bar = progress_bar(steps, f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress and self.dist.is_main, initial=start)
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
            if self._signal_at is not None and self._signal_at[:2] == (epoch, done):
                print(f"{SIGNAL_AT_ENV}: {self._signal_at[2].name} after epoch {epoch} step {done}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), self._signal_at[2])
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
        synchronize(self.device)
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

    def evaluate(self, model: nn.Module | None = None) -> SplitAccuracy:
        """Accuracy of the mean logits of all experts on the test set, overall and per split (in a
        torchrun job each rank evaluates its shard and the per-class counts are summed)."""
        return evaluate_model(model or self.model, self.test_loader, self.class_counts, device=self.device, amp=self.amp,
                              prefetch=self.cfg.train.prefetch, dist=self.dist,
                              show_progress=self.cfg.train.progress and self.dist.is_main)

    def _average_bn_statistics(self) -> None:
        """Every rank evaluates, and rank 0 saves, the same network (with sync_bn the statistics are equal already)."""
        if not self.cfg.train.sync_bn:
            average_bn_statistics(self.model, self.dist)

    def close(self) -> None:
        """Free the captured step graphs (train.cuda_graphs), before the process group goes: NCCL
        does not destroy a communicator while a graph that launches its collectives is alive, so
        `destroy_process_group` would hang at the end of a multi-GPU run."""
        if self.step.graphs is not None:
            self.step.graphs.drop()
            gc.collect()  # a graph held by a reference cycle goes now, not at some later collection
            synchronize(self.device)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to train.epochs; returns best_epoch, best_metric, history and `interrupted`
        (the run stopped on a signal after saving; `ride-fast train --resume auto` continues it)."""
        run_log = contextlib.nullcontext()
        if self.dist.is_main:
            if not self._owns_out_dir:  # before anything is written: a new run never mixes with another run's files
                claim_run_folder(self.out_dir, self.overwrite, self.log)
                self._owns_out_dir = True  # the folder is this run's now (a second fit() continues it)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            run_log = log_file(self.out_dir / "train.log", earlier=self._resume_records)
            self._resume_records = []
        with run_log:
            return self._fit()

    def summary(self) -> str:
        """The start-up lines of a run: data, loader, device, precision, batch per step and rank, output."""
        cfg = self.cfg
        return startup_summary(
            "train", data=cfg.data.name, num_classes=self.num_classes, train_images=len(self.train_set),
            test_images=len(self.test_set), loader=choose_loader(cfg.data, self.train_set), device=self.device, amp=self.amp,
            amp_setting=cfg.train.amp, batch=cfg.data.batch_size, world_size=self.dist.world_size,
            accumulate_steps=cfg.train.accumulate_steps, out=self.out_dir)

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.dist.is_main:
            self.log(self.summary())
            opt = "fused" if self.optimizer.defaults.get("fused") else "foreach" if self.optimizer.defaults.get("foreach") else "for-loop"
            LOGGER.debug(f"fast path: model.batched={cfg.model.batched}, model.channels_last={cfg.model.channels_last}, "
                         f"loss path {self.loss_path}, {opt} SGD, train.compile={cfg.train.compile}, "
                         f"train.cuda_graphs={cfg.train.cuda_graphs}, train.prefetch={cfg.train.prefetch}")
            self._write_config()
            self._tb = tensorboard_writer(self.out_dir, cfg.train.tensorboard, self.log)
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
        if not interrupted and self.dist.is_main:
            if self.best_eval is not None:  # the epoch best.pt holds, as the printed best epoch
                write_per_class_report(self.out_dir, self.best_epoch, self.best_eval, self.class_counts, source="best.pt")
            elif self.last_eval is not None:  # best.pt is an epoch from before a resume (an older checkpoint without best_eval)
                write_per_class_report(self.out_dir, self.epoch, self.last_eval, self.class_counts,
                                       name=f"per_class_accuracy_epoch_{self.epoch:04d}")
            self.log(f"best epoch {self.best_epoch}: {self.best_metric:.2f}; checkpoints in {self.out_dir}")
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
                    self.best_metric, self.best_epoch, self.best_eval = metric, epoch, acc
                self.log(
                    f"epoch {epoch:3d}  lr {result.lr:.4f}  loss {result.loss:.4f}  "
                    f"test {acc.overall:5.1f} (many {pct(acc.many, '5.1f')} med {pct(acc.medium, '5.1f')} few {pct(acc.few, '5.1f')})  "
                    f"{result.images_per_s:,.0f} img/s  data wait {result.data_wait:.1f}/{result.seconds:.1f} s"
                )
            if result.nonfinite:
                warn(self.log, f"epoch {epoch} skipped {plural(result.nonfinite, 'step')} with a non-finite loss")
            self.epoch = epoch
            self.history.append(record)
            if self.dist.is_main:
                with open(self.out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json_text(record) + "\n")
                tensorboard_log(self._tb, record)
            self.save(is_best)  # every rank: the checkpoint gathers each rank's RNG state
            if epoch < cfg.train.epochs and self._stop_requested(agree=True):  # a signal during evaluation / saving
                self.log(f"stopped by {self._stop.requested} after epoch {epoch}; `ride-fast train ... --resume auto` continues")
                return True
        return False

    def _write_config(self) -> None:
        """config.yaml is the config the run started with: a resume never rewrites it. A resume that
        changes keys writes config_resume_N.yaml, its resolved config with the changes in its header."""
        first = self.out_dir / "config.yaml"
        if self._resumed is None or not first.exists():
            atomic_write_text(dump_config(self.cfg), first)
        elif self._resumed["changes"]:
            n = len(list(self.out_dir.glob("config_resume_*.yaml"))) + 1
            header = [f"# resume {n}: from {self._resumed['from']} at {self._resumed['at']}; keys changed (old -> new):"]
            header += [f"#   {key}: {old!r} -> {new!r}" for key, old, new in self._resumed["changes"]]
            atomic_write_text("\n".join(header) + "\n" + dump_config(self.cfg), self.out_dir / f"config_resume_{n}.yaml")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng: dict | None = None) -> dict:
        """The checkpoint: model and optimizer state in the per-expert layout (see module docstring).

        "step" > 0 marks a checkpoint written inside epoch epoch + 1 after that many steps, with the
        epoch's metric sums so far ("epoch_sums"). "loader" is the training loader's position: every
        random draw of the loaders derives from (seed, epoch, rank, position), so the position is
        all of a loader's RNG state. "rng" holds every rank's generators (`rng_state`): pass the
        gathered `rng`, or call this on every rank of a torchrun job (the gather is a collective).
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
            "best_eval": self.best_eval.as_dict(with_per_class=True) if self.best_eval is not None else None,
            "config": config_to_dict(self.cfg),
            "model_args": {k: v for k, v in self.model.model_args.items() if k != "batched"},  # per-expert layout
            "class_counts": [int(c) for c in self.class_counts],
            "rng": rng if rng is not None else rng_state(),
            "loader": {"seed": self.cfg.train.seed, "epoch": self.epoch + 1, "batch": 0, "world_size": self.dist.world_size},
        }

    def save(self, is_best: bool) -> None:
        """At the end of an epoch: epoch_NNNN.pt (the last train.keep_last kept), last.pt, and best.pt
        when the epoch is the best so far. Every file is written atomically by rank 0; every rank
        calls it, to gather its RNG state into the checkpoint."""
        rng = rng_state()
        if not self.dist.is_main:
            return
        state = self.state_dict(rng)
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
        rng = rng_state()  # every rank's, gathered
        if not self.dist.is_main:
            return
        state = self.state_dict(rng)
        state.update(step=result.steps, epoch_sums=result.sums, loader=dict(state["loader"], batch=result.steps))
        atomic_save(state, self.out_dir / "last.pt")

    def restart_unsaved_run(self) -> bool:
        """`--resume auto` where train.out_dir has no last.pt: a run there that stopped before its first
        checkpoint (a torchrun job pre-empted in epoch 1) left only config.yaml, train.log and tensorboard/,
        so there is nothing to continue and nothing to lose: this run starts anew in the folder (train.log
        goes on) instead of refusing it. False, with the folder left to claim_run_folder, when it holds more."""
        found = run_files(self.out_dir)
        if not found or any(p.name not in UNSAVED_RUN_FILES for p in found):
            return False
        with held_records() as records:
            self.log(f"{self.out_dir} holds a run that stopped before its first checkpoint "
                     f"({', '.join(p.name for p in found)}): nothing to resume, starting it anew")
        self._resume_records = records
        self._owns_out_dir = True
        return True

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint; a corrupt file falls back to the newest readable one beside it.
        Its messages (where it resumed, the changed keys) also go to train.log once fit() opens it."""
        with held_records() as records:
            self._resume(Path(path))
        self._resume_records = records

    def _resume(self, path: Path) -> None:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            candidates = sorted(path.parent.glob("epoch_*.pt"), reverse=True)
            for alt in candidates:
                try:
                    ckpt = load_checkpoint(alt)
                except CheckpointError:
                    continue
                warn(self.log, f"{err}; resuming from {alt} instead")
                path = alt
                break
            else:
                raise
        changes = resume_changes(ckpt, self.cfg, path)  # refuses a change of the model or data shape, naming the key
        stored_counts = [int(c) for c in ckpt.get("class_counts", [])]
        if stored_counts and stored_counts != [int(c) for c in self.class_counts]:
            raise ValueError(f"cannot resume {path}: its training set had other class counts than {self.train_set.name} has now "
                             "(another data.root or list file?); resume with the data the run was trained on")
        self.model.load_state_dict(ckpt["model"])  # either layout
        load_canonical_optimizer_state(self.optimizer, self.model, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.best_metric = float(ckpt["best_metric"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.best_eval = SplitAccuracy(**ckpt["best_eval"]) if ckpt.get("best_eval") else None
        self._resume_step = int(ckpt.get("step", 0))
        self._resume_sums = dict(ckpt.get("epoch_sums", {}))
        set_rng_state(ckpt["rng"])  # this rank's own state (see set_rng_state for another number of ranks)
        saved_ranks = len(ckpt["rng"].get("ranks") or [None])
        if saved_ranks > 1 and saved_ranks != self.dist.world_size:
            rest = (f"ranks {saved_ranks} and up keep their generators as seeded by train.seed"
                    if self.dist.world_size > saved_ranks else "each rank restores the state of the rank with its number")
            self.log(f"the checkpoint holds the random generator states of {saved_ranks} ranks and this run has "
                     f"{self.dist.world_size}: {rest}")
        self._owns_out_dir = True
        where = f"epoch {self.epoch + 1} step {self._resume_step}" if self._resume_step else f"the end of epoch {self.epoch}"
        self.log(f"resumed from {path} at {where}")
        if changes:
            self.log(f"the config differs from the checkpoint's in {plural(len(changes), 'key')} "
                     "(old -> new; the epochs trained so far used the old values):")
            for key, old, new in changes:
                self.log(f"  {key}: {old!r} -> {new!r}")
        self._resumed = {"from": str(path), "at": where, "changes": changes}


def _seek(loader, epoch: int, start_batch: int) -> int:
    """Set the loader to `epoch`, starting at batch `start_batch`; returns how many batches the caller
    must still discard (loaders that cannot start mid-epoch: `seekable` false or absent)."""
    if start_batch and getattr(loader, "seekable", False):
        loader.set_epoch(epoch, start_batch=start_batch)
        return 0
    loader.set_epoch(epoch)
    return start_batch


