"""What a user watching a run sees: the start-up summary of `train` and `route`, levelled messages on
the console and in <out_dir>/train.log, real TensorBoard events, a warning when TensorBoard is
missing, and progress bars only on a terminal."""
import io
import json
import os
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ride_fast.cli import main
from ride_fast.config import load_config
from ride_fast.data import build_datasets
from ride_fast.engine.monitor import PROGRESS_ENV, progress, progress_bar, startup_summary
from ride_fast.engine.runtime import resolve_amp

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps_per_epoch=2",
        "model.num_experts=2", "loss.reweight_epoch=1", "optim.warmup_epochs=1", "optim.milestones=[1]",
        "train.epochs=1", "train.progress=false"]


def test_train_and_route_print_a_startup_summary_log_to_train_log_and_write_tensorboard_events(tmp_path, capsys):
    args = [*TINY, f"train.out_dir={tmp_path}", "train.amp=auto", "train.accumulate_steps=2", "train.tensorboard=true"]
    assert main(["train", "-v", *args]) == 0
    out = capsys.readouterr().out
    assert "fast path: model.batched=True, model.channels_last=True, loss path analytic" in out  # a DEBUG line, shown by -v
    precision = {"none": "fp32"}.get(resolve_amp("auto", torch.device("cpu")), "bf16")
    train_set, test_set = build_datasets(load_config(overrides=TINY).data)
    images = f"{train_set.num_classes} classes, {len(train_set):,} training and {len(test_set):,} test images"
    summary = [
        f"train: data mnist_lt, {images}, loader memory",
        f"  device cpu, precision {precision} (chosen by train.amp=auto), 1 rank",
        "  batch 16 per optimizer step, 16 per rank, run as 2 micro-batches of 8 (train.accumulate_steps)",
        f"  output {tmp_path}",
    ]
    assert "\n".join(summary) in out
    log = (tmp_path / "train.log").read_text()
    assert summary[0] in log and summary[2] in log and " INFO epoch   1  lr " in log
    last = f"best epoch 1: {json.loads((tmp_path / 'metrics.jsonl').read_text())['test']['overall']:.2f}; checkpoints in {tmp_path}"
    assert log.rstrip().endswith(last) and out.rstrip().endswith(last)  # the run's last line, in train.log too

    events = EventAccumulator(str(tmp_path / "tensorboard"))  # TensorBoard's own reader of the event file
    events.Reload()
    assert {"train/loss", "train/lr", "test/overall", "test/few"} <= set(events.Tags()["scalars"])
    [loss] = events.Scalars("train/loss")
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert loss.step == 1 and loss.value == pytest.approx(record["loss"], rel=1e-6)

    (tmp_path / "router.yaml").write_text("router:\n  top_k: 5\n  epochs: 1\n  batch_size: 64\n")
    assert main(["route", "--config", str(tmp_path / "router.yaml"), "--checkpoint", str(tmp_path / "last.pt"),
                 "--out", str(tmp_path / "routed.pt"), "--no-eval", "data.test_per_class=10", "train.amp=none"]) == 0
    out = capsys.readouterr().out
    assert (f"route: data mnist_lt, {images}, loader memory\n"
            "  device cpu, precision fp32, 1 rank\n  batch 64 per optimizer step, 64 per rank\n"
            f"  output {tmp_path / 'routed.pt'}") in out


def test_quiet_console_shows_warnings_while_train_log_keeps_everything_and_missing_tensorboard_warns(tmp_path, capsys,
                                                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert main(["train", "-q", *TINY, f"train.out_dir={tmp_path}", "train.tensorboard=true"]) == 0
    out = capsys.readouterr().out
    warning = "train.tensorboard=true but the tensorboard package is not installed"
    assert f"warning: {warning}" in out
    assert "epoch   1" not in out and "train: data" not in out  # INFO messages stay off the console under -q
    assert "fast path:" not in (tmp_path / "train.log").read_text()  # the log file keeps INFO and above
    log = (tmp_path / "train.log").read_text()
    assert f" WARNING {warning}" in log and " INFO epoch   1  lr " in log and " INFO train: data mnist_lt" in log
    assert not (tmp_path / "tensorboard").exists()


def test_progress_bars_show_on_a_terminal_unless_switched_off(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert list(progress(range(3), "eval")) == [0, 1, 2]
    assert "eval:" in sys.stderr.getvalue() and "/3 [" in sys.stderr.getvalue()  # a bar was drawn
    assert progress_bar(3, "x", enabled=False) is None
    monkeypatch.setenv(PROGRESS_ENV, "0")  # what --no-progress sets
    assert progress_bar(3, "x", enabled=True) is None
    monkeypatch.delenv(PROGRESS_ENV)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert progress_bar(3, "x", enabled=True) is None
    assert list(progress(range(2), "eval")) == [0, 1]


def test_no_progress_flag_is_accepted_before_and_after_the_command(monkeypatch, capsys):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert main(["show-config", "--no-progress"]) == 0
    assert os.environ[PROGRESS_ENV] == "0"
    monkeypatch.delenv(PROGRESS_ENV)
    assert main(["-q", "show-config"]) == 0 and "model:" in capsys.readouterr().out


def test_a_warning_of_ride_fast_prints_as_a_message_not_as_a_python_source_line(tmp_path, capsys):
    """`convert` of a file that pickles other objects: "warning: ..." on the console, no "convert.py:N: UserWarning"."""
    import argparse
    import warnings

    src = tmp_path / "original.pth"
    torch.save({"state_dict": {}, "config": argparse.Namespace(lr=0.1)}, src)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["convert", str(src), str(tmp_path / "out.pt"), "--model", "resnet32"]) == 2  # no weights in it
    out, err = capsys.readouterr()
    assert f"warning: {src} holds Python objects besides tensors" in out and "this file: argparse.Namespace" in out
    assert "UserWarning" not in out + err and "convert.py" not in err


def test_a_resumed_run_writes_where_it_resumed_and_the_changed_keys_to_train_log(tmp_path, capsys):
    assert main(["train", *TINY, f"train.out_dir={tmp_path}", "train.tensorboard=false"]) == 0
    assert main(["train", *TINY, f"train.out_dir={tmp_path}", "train.tensorboard=false", "train.epochs=2",
                 "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    resumed = f"resumed from {tmp_path / 'last.pt'} at the end of epoch 1"
    assert resumed in out and "  train.epochs: 1 -> 2" in out  # on the console, as before
    log = (tmp_path / "train.log").read_text().splitlines()
    lines = [line.split(" INFO ", 1)[1] for line in log if " INFO " in line]
    assert resumed in lines and "  train.epochs: 1 -> 2" in lines  # and in the run's log, with time and level
    epoch_2 = next(i for i, line in enumerate(lines) if line.startswith("epoch   2 "))
    assert lines.index(resumed) < epoch_2  # in the order they happened


def test_the_summary_gives_the_micro_batches_the_step_runs():
    def micro(batch, accumulate_steps, world_size=1):
        return startup_summary("train", data="d", num_classes=2, train_images=1, test_images=1, loader="memory", device="cpu",
                               amp="none", amp_setting="none", batch=batch, world_size=world_size,
                               accumulate_steps=accumulate_steps).splitlines()[2]

    assert micro(16, 2) == "  batch 16 per optimizer step, 16 per rank, run as 2 micro-batches of 8 (train.accumulate_steps)"
    assert micro(16, 3).endswith("run as 3 micro-batches of 5-6 (train.accumulate_steps)")  # tensor_split: 6, 5, 5
    assert micro(16, 32).endswith("run as 16 micro-batches of 1 (train.accumulate_steps)")  # no empty micro-batch runs
    assert micro(16, 4, world_size=2).endswith("8 per rank, run as 4 micro-batches of 2 (train.accumulate_steps)")
    assert micro(16, 1) == "  batch 16 per optimizer step, 16 per rank"
