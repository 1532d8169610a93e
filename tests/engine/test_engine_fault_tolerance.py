"""A crash, a kill or a signal never costs more than the last epoch; non-finite losses are skipped
and counted; the run reports what a user watches (JSON lines, TensorBoard, the per-class picture)."""
import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ride_fast.config import load_config
from ride_fast.engine import Trainer, load_checkpoint
from ride_fast.engine.monitor import SIGNAL_AT_ENV, signal_at_from_env

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.progress=false",
        "model.num_experts=2", "loss.reweight_epoch=2", "optim.warmup_epochs=1", "optim.milestones=[2]"]


def tiny_cfg(out, *extra):
    return load_config(overrides=[*TINY, "train.max_steps_per_epoch=6", f"train.out_dir={out}", *extra])


def state_of(trainer_or_path) -> dict:
    if isinstance(trainer_or_path, Trainer):
        model = trainer_or_path.state_dict()["model"]
        opt = trainer_or_path.state_dict()["optimizer"]
    else:
        ckpt = load_checkpoint(trainer_or_path)
        model, opt = ckpt["model"], ckpt["optimizer"]
    out = {f"model.{k}": v for k, v in model.items()}
    out.update({f"momentum.{i}": s["momentum_buffer"] for i, s in opt["state"].items()})
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class SignalAtBatch:
    """A training loader that sends this process `sig` while handing out batch `at` of epoch `epoch`."""

    def __init__(self, loader, sig, epoch: int, at: int):
        self.loader, self.sig, self.epoch_to_hit, self.at = loader, sig, epoch, at
        self.start = 0
        self.seekable = loader.seekable  # the trainer resumes it mid-epoch as it would the loader

    def set_epoch(self, epoch, start_batch=0):
        self.loader.set_epoch(epoch, start_batch=start_batch)
        self.current, self.start = epoch, start_batch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=self.start):
            if self.current == self.epoch_to_hit and i == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.parametrize("sig,accumulate", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-accumulate_steps=2"])
def test_a_signal_saves_at_the_next_step_and_the_resumed_run_is_bit_identical(tmp_path, sig, accumulate):
    """With train.accumulate_steps the checkpoint's step and loader position still count optimizer steps."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    acc = f"train.accumulate_steps={accumulate}"
    full = Trainer(tiny_cfg(tmp_path / "full", "train.epochs=3", acc), log=lambda s: None)
    full.fit()
    cut = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=3", acc), log=lambda s: None)
    cut.train_loader = SignalAtBatch(cut.train_loader, sig, epoch=2, at=3)
    summary = cut.fit()
    assert summary["interrupted"] and cut.epoch == 1
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["loader"]["batch"]) == (1, 4, 4)  # batch 3 (the 4th) finished its step
    assert sorted(p.name for p in (tmp_path / "cut").glob("epoch_*.pt")) == ["epoch_0001.pt"]  # epoch files stay whole
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored

    resumed = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=3", acc), log=lambda s: None)
    resumed.resume(tmp_path / "cut" / "last.pt")
    assert resumed.fit()["interrupted"] is False
    assert_identical(state_of(full), state_of(resumed))
    records = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == pytest.approx(full_records[1]["loss"], rel=1e-6)  # the interrupted epoch's sums carried over
    assert records[1]["test"] == full_records[1]["test"]


def test_the_signal_hook_stops_an_in_process_run_after_the_step_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv(SIGNAL_AT_ENV, "2:3:SIGTERM")
    assert signal_at_from_env() == (2, 3, signal.SIGTERM)
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=lambda s: None)
    assert t.fit()["interrupted"] and t.epoch == 1
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    monkeypatch.setenv(SIGNAL_AT_ENV, "2:SIGTERM")
    with pytest.raises(ValueError, match="RIDE_FAST_SIGNAL_AT='2:SIGTERM': expected EPOCH:STEP:SIGNAL"):
        signal_at_from_env()
    monkeypatch.delenv(SIGNAL_AT_ENV)
    assert signal_at_from_env() is None  # off by default


class Unseekable:
    """A loader as the DALI loaders present themselves to the trainer: no mid-epoch start."""

    seekable = False

    def __init__(self, loader):
        self.loader, self.yielded = loader, 0

    def set_epoch(self, epoch, start_batch=0):
        assert start_batch == 0, "the trainer must not ask an unseekable loader for a start batch"
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.yielded += 1
            yield batch


def test_a_loader_that_cannot_seek_resumes_by_discarding_the_done_batches(tmp_path):
    full = Trainer(tiny_cfg(tmp_path / "full", "train.epochs=2"), log=lambda s: None)
    full.fit()
    cut = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=2"), log=lambda s: None)
    cut.train_loader = SignalAtBatch(cut.train_loader, signal.SIGTERM, epoch=2, at=3)
    assert cut.fit()["interrupted"]
    resumed = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=2"), log=lambda s: None)
    resumed.resume(tmp_path / "cut" / "last.pt")
    resumed.train_loader = loader = Unseekable(resumed.train_loader)
    assert resumed.fit()["interrupted"] is False
    assert loader.yielded == 6  # max_steps_per_epoch: the 4 done batches drawn again and discarded, then 2 steps
    assert_identical(state_of(full), state_of(resumed))


def test_a_damaged_mid_epoch_checkpoint_falls_back_to_the_epoch_checkpoint(tmp_path):
    cut = Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=lambda s: None)
    cut.train_loader = SignalAtBatch(cut.train_loader, signal.SIGTERM, epoch=2, at=1)
    cut.fit()
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    messages = []
    again = Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=messages.append)
    again.resume(last)
    assert again.epoch == 1 and again._resume_step == 0 and any("epoch_0001.pt instead" in m for m in messages)


# ---------------------------------------------------------------------------- real processes
PROC_ARGS = [*TINY, "train.epochs=3"]  # whole epochs: 61 steps of 16 MNIST-LT images
KILL_AT = (2, 25)  # epoch 2, after its step 25 of 61: mid-epoch by construction


def _launch(out: Path, *extra: str, signal_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop(SIGNAL_AT_ENV, None)
    if signal_at:
        env[SIGNAL_AT_ENV] = signal_at  # the process signals itself right after that step (engine/monitor.py)
    return subprocess.Popen([sys.executable, "-m", "ride_fast", "train", *PROC_ARGS, f"train.out_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, returncode: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == returncode, out[-2000:] + err[-2000:]
    return out, err


def _epochs_logged(out: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finish(_launch(out))
    return state_of(out / "last.pt")


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(uninterrupted, tmp_path):
    epoch, step = KILL_AT
    _, err = _finish(_launch(tmp_path, signal_at=f"{epoch}:{step}:SIGKILL"), returncode=-signal.SIGKILL)
    assert f"SIGKILL after epoch {epoch} step {step}" in err  # killed inside epoch 2 ...
    assert _epochs_logged(tmp_path) == [1]  # ... which never finished
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)  # nothing after the kill was written: the end of epoch 1 is kept
    out, _ = _finish(_launch(tmp_path, "--resume", "auto"))
    assert "resumed from" in out and "the end of epoch 1" in out
    assert _epochs_logged(tmp_path) == [1, 2, 3]
    assert_identical(uninterrupted, state_of(tmp_path / "last.pt"))


def test_sigterm_exits_cleanly_and_resume_gives_bit_identical_weights(uninterrupted, tmp_path):
    epoch, step = KILL_AT
    out, _ = _finish(_launch(tmp_path, signal_at=f"{epoch}:{step}:SIGTERM"))  # exit status 0
    assert f"stopped by SIGTERM in epoch {epoch} after step {step};" in out and "--resume auto" in out
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (epoch - 1, step)  # mid-epoch, at the next step boundary
    assert _epochs_logged(tmp_path) == [1]
    out, _ = _finish(_launch(tmp_path, "--resume", "auto"))
    assert f"at epoch {epoch} step {step}" in out
    assert_identical(uninterrupted, state_of(tmp_path / "last.pt"))


# ---------------------------------------------------------------------------- non-finite losses
def _poison(trainer: Trainer, bad_steps) -> list:
    """Make the loss NaN at the given (0-based) steps of the run; returns the step log."""
    forward = trainer.criterion.forward
    calls = []

    def poisoned(*args):
        loss = forward(*args)
        calls.append(len(calls))
        return loss * math.nan if (len(calls) - 1) in bad_steps else loss

    trainer.criterion.forward = poisoned
    return calls


@pytest.mark.parametrize("variant", [["optim.implementation=fused"], ["optim.implementation=foreach"], ["train.amp=fp16"]],
                         ids=["fused", "foreach", "fp16"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, variant):
    # 3 steps an epoch: fp16 steps are slow on the CPU (no native fp16 convolution backward)
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=1", "train.amp=none", "train.max_steps_per_epoch=3", *variant), log=lambda s: None)
    _poison(t, {0, 3})  # the very first step too: momentum must not start from garbage; 3: the epoch's last step
    before = state_of(t)
    t.set_epoch_lr(1)
    t.train_loader.set_epoch(1)
    batches = iter(t.train_loader)
    batch = next(batches)
    t.step(batch.images, batch.labels)
    assert_identical(before, state_of(t))  # skipped: weights and momentum untouched
    result = t.train_epoch(1)
    assert result.nonfinite == 1 and math.isfinite(result.loss)  # the epoch's own poisoned step
    assert all(torch.isfinite(v).all() for v in state_of(t).values())


def test_k_non_finite_steps_in_a_row_stop_with_a_clear_error(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=2", "train.max_nonfinite_steps=3", "train.log_interval=2"), log=lambda s: None)
    _poison(t, set(range(6, 100)))  # epoch 1 is fine, then every step fails
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 4: 4 training steps in a row had a non-finite loss.*"
                                                 r"train.max_nonfinite_steps=3"):
        t.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # the good epoch is kept


def test_isolated_non_finite_steps_do_not_stop_the_run(tmp_path):
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=1", "train.max_nonfinite_steps=2"), log=lambda s: None)
    _poison(t, {1, 3, 5})
    t.fit()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["nonfinite_steps"] == 3


# ---------------------------------------------------------------------------- observability
def test_metrics_lines_report_throughput_data_wait_and_splits_and_the_end_draws_per_class_accuracy(tmp_path, monkeypatch):
    events = []

    class FakeWriter:
        def __init__(self, log_dir):
            events.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            events.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=lambda s: None).fit()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_s"] <= r["seconds"] and r["nonfinite_steps"] == 0
        assert set(r["test"]) == {"overall", "many", "medium", "few"}
    assert (tmp_path / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "per_class_accuracy.json").read_text())
    assert len(report["per_class_accuracy"]) == len(report["class_counts"]) == 10
    assert events[0] == ("dir", str(tmp_path / "tensorboard")) and events[-1] == ("closed",)
    assert ("test/few", records[1]["test"]["few"], 2) in events and any(e[0] == "train/loss" for e in events)
