"""Stage-1 training end to end: files written, bit-identical resume, mixed precision, clear errors,
the train / eval commands and distillation from a teacher checkpoint (ride_fast.engine.trainer)."""
import json

import numpy as np
import pytest
import torch

from ride_fast.cli import main
from ride_fast.config import load_config
from ride_fast.data import ArrayDataset
from ride_fast.engine import CheckpointError, Trainer, load_checkpoint

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps_per_epoch=2",
        "train.progress=false", "model.num_experts=2", "loss.reweight_epoch=1", "optim.warmup_epochs=1",
        "optim.milestones=[1]"]


def tiny_cfg(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"train.out_dir={tmp_path}", *extra])


def test_train_writes_config_metrics_and_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=2")
    summary = Trainer(cfg, log=lambda s: None).fit()
    assert summary["best_epoch"] in (1, 2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["lr"] == pytest.approx(0.1 * 0.01)  # after the milestone
    assert set(lines[0]["test"]) == {"overall", "many", "medium", "few"}
    assert np.isfinite(lines[0]["loss"])
    assert load_config(tmp_path / "config.yaml") == cfg
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["model_args"]["num_experts"] == 2
    assert (tmp_path / "best.pt").exists()
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]  # keep_last=2

def _params(trainer):
    return [p.detach().clone() for p in trainer.model.state_dict().values()]


def test_resume_gives_bit_identical_weights(tmp_path):
    full = Trainer(tiny_cfg(tmp_path / "full", "train.epochs=3"), log=lambda s: None)
    full.fit()
    first = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=1"), log=lambda s: None)
    first.fit()
    resumed = Trainer(tiny_cfg(tmp_path / "cut", "train.epochs=3"), log=lambda s: None)
    resumed.resume(tmp_path / "cut" / "last.pt")
    resumed.fit()
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_falls_back_to_previous_good_one(tmp_path):
    Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=lambda s: None).fit()
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as after a crash mid-write elsewhere
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(last)
    messages = []
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=messages.append)
    t.resume(last)
    assert t.epoch == 2 and any("resuming from" in m for m in messages)


# Relative gap between the loss of one autocast forward and the float32 loss of the same weights and
# batch. bf16 keeps 8 mantissa bits, fp16 11. Measured on this test's batch: bf16 about 1e-3; fp16
# about 1e-5 on a Xeon with AMX and 5e-5 to 6e-5 on one without (oneDNN's fp16 kernels differ).
# The fp16 bound stays below the bf16 gap, so a change of precision shows (and autocast switched
# off: float32 features).
AMP_RTOL = {"bf16": 5e-3, "fp16": 2e-4}
AMP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_on_cpu(tmp_path, amp):
    """train.amp runs the step's forward under autocast of that dtype (the convolutions' features in
    it; the cosine heads compute in float32 by design, models/heads.py), the loss stays within
    AMP_RTOL of float32, fp16 scales the loss, and weights and batches are channels-last (the
    weights still after bf16 steps)."""
    t = Trainer(tiny_cfg(tmp_path, "train.epochs=1", f"train.amp={amp}", "model.channels_last=true"), log=lambda s: None)
    assert t.step.amp == amp and t.step.scaler.is_enabled() == (amp == "fp16")
    convs = [p for p in t.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    t.train_loader.set_epoch(1)
    batch = next(iter(t.train_loader))
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = t.model.register_forward_hook(lambda m, i, out: seen.append((out.features.dtype, out.expert_logits.dtype)))
    loss, _ = t.step.forward_loss(batch.images, batch.labels)  # the step's own forward
    reference = t.criterion(t.model(batch.images).expert_logits, batch.labels)  # the same weights in float32
    hook.remove()
    assert seen == [(AMP_DTYPE[amp], torch.float32), (torch.float32, torch.float32)]
    gap = abs(loss.item() - reference.item()) / reference.item()
    assert gap < AMP_RTOL[amp], f"{amp} loss {loss.item()} vs float32 {reference.item()}: relative gap {gap:.2e}"
    if amp == "fp16":
        return  # an fp16 backward is slow on the CPU (no native kernel); GradScaler steps: test_engine_fault_tolerance.py
    result = t.train_epoch(1)
    assert result.steps == 2 and result.nonfinite == 0 and np.isfinite(result.loss)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # the optimizer keeps the layout


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="model.num_classes=7 but the data set"):
        Trainer(tiny_cfg(tmp_path, "model.num_classes=7"), log=lambda s: None)
    empty_class = ArrayDataset(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.tensor([0, 0, 2, 2]), 3, (0.5,), (0.5,), "holes")
    with pytest.raises(ValueError, match=r"holes: classes \[1\] have no training image"):
        Trainer(tiny_cfg(tmp_path), train_set=empty_class, test_set=empty_class, log=lambda s: None)
    with pytest.raises(ValueError, match="model.name: unknown name 'resnet33'"):
        Trainer(tiny_cfg(tmp_path, "model.name=resnet33"), log=lambda s: None)


@pytest.mark.parametrize("fails", [False, True])
def test_cli_train_frees_the_trainer_before_the_process_group(monkeypatch, tmp_path, fails):
    """`ride-fast train` closes the trainer (its captured graphs) before destroying the process
    group, also when training fails: a live graph holding NCCL work hangs destroy_process_group."""
    import ride_fast.engine
    import ride_fast.engine.distributed

    calls = []

    class Recording(Trainer):
        def fit(self):
            calls.append("fit")
            if fails:
                raise RuntimeError("out of memory")
            return super().fit()

        def close(self):
            calls.append("close")
            super().close()

    monkeypatch.setattr(ride_fast.engine, "Trainer", Recording)
    monkeypatch.setattr(ride_fast.engine.distributed, "shutdown_distributed", lambda: calls.append("shutdown"))
    args = ["train", *TINY, f"train.out_dir={tmp_path}", "train.epochs=1"]
    assert main(args) == (2 if fails else 0)  # a failure is reported as "ride-fast train: error: ..."
    assert calls == ["fit", "close", "shutdown"]


def test_cli_train_resume_and_eval(tmp_path, capsys):
    args = [*TINY, f"train.out_dir={tmp_path}", "train.epochs=1"]
    assert main(["train", *args]) == 0
    first_config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    # a change of the model's shape is refused, naming the key, before anything is written
    assert main(["train", "--resume", "auto", *args[:-1], "train.epochs=2", "model.num_experts=3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "model.num_experts: 2 -> 3" in err and "state dict" not in err
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    # other changes are printed (old -> new) before the first step; config.yaml keeps the config the run started with
    assert main(["train", "--resume", "auto", *args[:-1], "train.epochs=2", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr: 0.1 -> 0.5" in out and "train.epochs: 1 -> 2" in out
    assert out.index("optim.lr: 0.1 -> 0.5") < out.index("epoch   2")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert (tmp_path / "config.yaml").read_text() == first_config
    record = (tmp_path / "config_resume_1.yaml").read_text()
    assert "# resume 1: from" in record and "#   optim.lr: 0.1 -> 0.5" in record
    assert load_config(tmp_path / "config_resume_1.yaml").optim.lr == 0.5
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "last.pt"), "--json", str(out_json)]) == 0
    assert "overall" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())["per_class"]) == 10
    assert main(["train", "model.num_experts=0", f"train.out_dir={tmp_path}/x"]) == 2
    assert "num_experts" in capsys.readouterr().err


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    Trainer(tiny_cfg(tmp_path / "teacher", "train.epochs=1", "model.num_experts=3"), log=lambda s: None).fit()
    teacher_ckpt = tmp_path / "teacher" / "last.pt"
    student = Trainer(tiny_cfg(tmp_path / "student", "train.epochs=1", f"distill.teacher_checkpoint={teacher_ckpt}"), log=lambda s: None)
    assert student.teacher is not None and student.teacher.num_experts == 3 and student.model.num_experts == 2
    assert student.teacher.training  # the original's quirk: teacher BatchNorm in training mode
    assert not any(p.requires_grad for p in student.teacher.parameters())
    before = [p.detach().clone() for p in student.teacher.parameters()]
    assert np.isfinite(student.train_epoch(1).loss)
    assert all(torch.equal(a, b) for a, b in zip(before, student.teacher.parameters()))
    off = Trainer(tiny_cfg(tmp_path / "s2", f"distill.teacher_checkpoint={teacher_ckpt}", "distill.teacher_bn_train=false"), log=lambda s: None)
    assert not off.teacher.training


def test_trainer_records_the_loss_path_the_dispatch_takes(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path), log=lambda s: None)
    assert trainer.cfg.loss.name == "ride" and trainer.loss_path == "analytic"  # the CPU's closed form
    assert Trainer(tiny_cfg(tmp_path / "ref", "loss.impl=reference"), log=lambda s: None).loss_path == "reference"


def test_per_class_report_is_the_epoch_best_pt_holds(tmp_path, monkeypatch):
    """per_class_accuracy.json / .png come from best.pt's epoch (also after a resume), not the last epoch."""
    from ride_fast.engine.metrics import SplitAccuracy

    scores = iter([60.0, 30.0, 20.0])

    def fake_evaluate(self, model=None):
        overall = next(scores)
        return SplitAccuracy(overall, overall, overall, overall, [overall] * 10)

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    Trainer(tiny_cfg(tmp_path, "train.epochs=2"), log=lambda s: None).fit()
    report = json.loads((tmp_path / "per_class_accuracy.json").read_text())
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert report["epoch"] == 1 and report["checkpoint"] == "best.pt" and report["test"]["overall"] == 60.0
    resumed = Trainer(tiny_cfg(tmp_path, "train.epochs=3"), log=lambda s: None)
    resumed.resume(tmp_path / "last.pt")
    assert resumed.fit()["best_epoch"] == 1
    report = json.loads((tmp_path / "per_class_accuracy.json").read_text())
    assert report["epoch"] == 1 and report["per_class_accuracy"] == [60.0] * 10


def test_reports_are_standard_json_with_null_for_an_empty_split(tmp_path, monkeypatch):
    """No class with > 100 images: the many-shot accuracy is undefined, written as null (not NaN, which JSON lacks)."""
    from ride_fast.engine.metrics import SplitAccuracy

    nan = float("nan")
    monkeypatch.setattr(Trainer, "evaluate", lambda self, model=None: SplitAccuracy(50.0, nan, 50.0, 50.0, [50.0] * 9 + [nan]))
    Trainer(tiny_cfg(tmp_path, "train.epochs=1"), log=lambda s: None).fit()

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))

    report = strict((tmp_path / "per_class_accuracy.json").read_text())
    assert report["test"]["many"] is None and report["test"]["few"] == 50.0 and report["per_class_accuracy"][-1] is None
    record = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test"] == {"overall": 50.0, "many": None, "medium": 50.0, "few": 50.0}


def test_resume_refuses_a_training_set_with_other_class_counts(tmp_path):
    """Same config keys, other data behind them (another data.root): refused before a step, with the reason."""
    def data(counts):
        labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
        images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        return ArrayDataset(images, labels, 3, (0.5,) * 3, (0.5,) * 3, "tiny")

    first = data((12, 6, 3))
    Trainer(tiny_cfg(tmp_path, "train.epochs=1"), train_set=first, test_set=first, log=lambda s: None).fit()
    other = data((12, 5, 4))
    trainer = Trainer(tiny_cfg(tmp_path, "train.epochs=2"), train_set=other, test_set=other, log=lambda s: None)
    with pytest.raises(ValueError, match=r"cannot resume .*last\.pt: its training set had other class counts than tiny has now"):
        trainer.resume(tmp_path / "last.pt")


def _folder_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_never_mixes_with_another_runs_folder(tmp_path, capsys):
    args = [*TINY, f"train.out_dir={tmp_path}", "train.epochs=1"]
    assert main(["train", *args]) == 0
    (tmp_path / "notes.txt").write_text("mine")
    before = _folder_state(tmp_path)
    capsys.readouterr()
    assert main(["train", *args]) == 2  # a new run into the same folder: refused, nothing touched
    err = capsys.readouterr().err
    assert f"train.out_dir {tmp_path} holds another run" in err
    for choice in ("--resume auto", "a new train.out_dir", "--overwrite"):
        assert choice in err
    assert _folder_state(tmp_path) == before
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["train", "--overwrite", *args]) == 0  # the old run's files go, other files stay
    assert "deleted the previous run's files" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["train", "--resume", "auto", *args[:-1], "train.epochs=2"]) == 0  # continuing is not a new run
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(tmp_path, capsys):
    """What a torchrun job pre-empted in epoch 1 leaves (config.yaml, train.log, tensorboard/, no last.pt):
    the restarted attempt's `--resume auto` starts the run anew there instead of refusing the folder."""
    def leftovers(folder):
        folder.mkdir()
        (folder / "config.yaml").write_text("model:\n  name: resnet32\n")
        (folder / "train.log").write_text("2026-01-01 00:00:00,000 INFO train: data mnist_lt (the first attempt)\n")
        (folder / "tensorboard").mkdir()
        return [*TINY, f"train.out_dir={folder}", "train.epochs=1"]

    args = leftovers(tmp_path / "died")
    assert main(["train", *args]) == 2  # without --resume auto: a new run, refused as before
    assert "holds another run" in capsys.readouterr().err
    assert main(["train", "--resume", "auto", *args]) == 0
    said = f"{tmp_path / 'died'} holds a run that stopped before its first checkpoint (config.yaml, tensorboard, train.log)"
    assert said in capsys.readouterr().out
    log = (tmp_path / "died" / "train.log").read_text()
    assert log.startswith("2026-01-01 00:00:00,000 INFO train: data mnist_lt (the first attempt)\n")  # the log goes on
    assert f" INFO {said}" in log and " INFO epoch   1  lr " in log
    assert [json.loads(x)["epoch"] for x in (tmp_path / "died" / "metrics.jsonl").read_text().splitlines()] == [1]

    args = leftovers(tmp_path / "epochs")
    (tmp_path / "epochs" / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a run that finished epochs: never restarted
    assert main(["train", "--resume", "auto", *args]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (tmp_path / "epochs" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
