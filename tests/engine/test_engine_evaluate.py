"""Evaluation (ride_fast.engine.evaluate): `ride-fast eval` on a stage-1 checkpoint builds the network
and the test data only, and gives the Trainer's own evaluation."""
import json

import pytest
import torch

from ride_fast.cli import main
from ride_fast.config import load_config
from ride_fast.engine import Trainer
from ride_fast.engine import trainer as trainer_module
from ride_fast.engine.evaluate import evaluate_checkpoint

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
