"""Evaluation (ride_fast.engine.evaluate): `ride-fast eval` on a stage-1 checkpoint builds the network
and the test data only, and gives the Trainer's own evaluation."""
import pytest

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
