"""Evaluation (ride_fast.engine.evaluate): `ride-fast eval` on a stage-1 checkpoint builds the network
and the test data only, and gives the Trainer's own evaluation."""
import json
import logging

import pytest
import torch

from ride_fast.cli import main
from ride_fast.config import load_config
from ride_fast.engine import Trainer
from ride_fast.engine import trainer as trainer_module
from ride_fast.engine.evaluate import evaluate_checkpoint
from ride_fast.engine.metrics import pct

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps_per_epoch=2",
        "train.progress=false", "model.num_experts=2", "loss.reweight_epoch=1", "optim.warmup_epochs=1",
        "optim.milestones=[1]", "train.epochs=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    trainer = Trainer(load_config(overrides=[*TINY, f"train.out_dir={out}"]), log=lambda s: None)
    trainer.fit()
    return trainer, out / "last.pt"


def test_evaluate_checkpoint_gives_the_trainers_evaluation(trained):
    trainer, path = trained
    expected = trainer.evaluate()
    got = evaluate_checkpoint(path)
    assert got.per_class == expected.per_class and got.overall == expected.overall
    batched = evaluate_checkpoint(path, {"model": {"batched": False}, "train": {"device": "cpu"}})  # either layout
    assert batched.overall == pytest.approx(expected.overall, abs=1.0)


def test_cli_eval_builds_no_trainer_optimizer_or_loss(trained, monkeypatch, capsys):
    _, path = trained

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation must not build a Trainer, an optimizer or a loss")

    for name in ("build_optimizer", "build_loss"):
        monkeypatch.setattr(trainer_module, name, refuse)
    monkeypatch.setattr(trainer_module.Trainer, "__init__", refuse)
    assert main(["eval", "--checkpoint", str(path)]) == 0
    assert "overall" in capsys.readouterr().out


def test_cli_eval_names_the_data_checkpoint_and_images_it_scored(trained, tmp_path, capsys):
    _, path = trained
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"{path} on mnist_lt, test split, 100 images: overall" in out  # data.test_per_class=10, 10 classes
    report = json.loads(out_json.read_text())
    assert report["checkpoint"] == str(path) and report["data"] == {"name": "mnist_lt", "root": "", "split": "test",
                                                                       "num_images": 100}
    assert len(report["per_class"]) == 10


def test_cli_eval_refuses_a_checkpoint_without_data_config(trained, tmp_path, capsys):
    """A converted original checkpoint stores no data config: eval names the reason and the options to pass
    instead of scoring the default data set; with data options it scores them."""
    _, path = trained
    ckpt = torch.load(path, weights_only=True)
    converted = tmp_path / "converted.pt"
    torch.save({"model": ckpt["model"], "model_args": ckpt["model_args"], "router": {}}, converted)
    assert main(["eval", "--checkpoint", str(converted)]) == 2
    err = capsys.readouterr().err
    assert "stores no data config" in err and "pass the data options, e.g. data.name=" in err
    assert main(["eval", "--checkpoint", str(converted), "data.name=mnist_lt", "data.test_per_class=10"]) == 0
    assert "on mnist_lt, test split, 100 images" in capsys.readouterr().out


def test_cli_eval_warns_about_options_that_do_not_apply(trained, capsys):
    _, path = trained
    assert main(["eval", "--checkpoint", str(path), "router.threshold=0.3", "optim.lr=0.5", "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "warning: router.threshold does not apply to" in out and "it has no router" in out
    assert "warning: optim.lr does not apply to `ride-fast eval`" in out and "train.device" not in out


def test_cli_eval_splits_by_the_checkpoints_class_counts(trained, capsys):
    """Another data.imbalance_factor rebuilds another training set: the many / medium / few splits stay
    those of the training set the checkpoint learned from, and a warning says the two differ."""
    trainer, path = trained
    expected = trainer.evaluate()
    assert main(["eval", "--checkpoint", str(path), "data.imbalance_factor=1"]) == 0
    out = capsys.readouterr().out
    assert f"warning: the training set built from the data options has other class counts than {path} was trained with" in out
    assert f"many {pct(expected.many)}  medium {pct(expected.medium)}  few {pct(expected.few)}" in out
    assert main(["eval", "--checkpoint", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_cli_eval_refuses_to_write_the_report_over_the_checkpoint(trained, capsys):
    _, path = trained
    before = path.read_bytes()
    assert main(["eval", "--checkpoint", str(path), "--json", str(path)]) == 2
    assert f"--json {path} is the checkpoint itself; give another file" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_cli_eval_names_a_report_path_it_cannot_write(trained, tmp_path, capsys):
    _, path = trained
    (tmp_path / "a_file").write_text("")
    assert main(["eval", "--checkpoint", str(path), "--json", str(tmp_path / "a_file" / "eval.json")]) == 2
    out, err = capsys.readouterr()
    assert "overall" in out  # the numbers, before the failed write
    assert err.strip() == (f"ride-fast eval: error: cannot write {tmp_path / 'a_file' / 'eval.json'}: "
                           f"{tmp_path / 'a_file'} is a file, not a folder")
    assert main(["eval", "--checkpoint", str(path), "--json", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path}: it is a folder; give a file path" in capsys.readouterr().err


def test_stage1_eval_reports_through_the_ride_fast_logger(trained, tmp_path, caplog):
    """Its lines are records of the `ride_fast` logger, as the routed evaluation's are (the command's
    console handler shows them, --log-level filters them), and its warnings are WARNING records."""
    from ride_fast.engine.evaluate import eval_report

    _, path = trained
    with caplog.at_level(logging.INFO, logger="ride_fast"):
        eval_report(path, {"data": {"imbalance_factor": 1}, "optim": {"lr": 0.5}}, tmp_path / "eval.json")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ride_fast"]

    def level(start: str) -> int:
        found = [lv for lv, message in records if message.startswith(start)]
        assert found, f"no record {start!r} among {records}"
        return found[0]

    assert level(f"{path} on mnist_lt, test split, 100 images: overall") == logging.INFO
    assert level(f"wrote {tmp_path / 'eval.json'}") == logging.INFO
    assert level("optim.lr does not apply to `ride-fast eval`") == logging.WARNING
    assert level(f"the training set built from the data options has other class counts than {path}") == logging.WARNING

def test_cli_eval_quiet_shows_only_the_warnings(trained, capsys):
    _, path = trained
    assert main(["eval", "--checkpoint", str(path), "-q", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "warning: optim.lr does not apply to `ride-fast eval`" in out and "overall" not in out
