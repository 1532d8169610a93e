"""`ride-fast analyze ...` end to end on real MNIST-LT digits, at a few training steps per model."""
import functools
import json

import pytest
import torch

from ride_fast.cli import main
from ride_fast.data import mnist_lt
from ride_fast.models import create_model

TINY = ["data.test_per_class=10", "data.batch_size=16", "data.eval_batch_size=200", "train.max_steps_per_epoch=2",
        "train.epochs=1", "train.progress=false", "optim.warmup_epochs=0", "optim.milestones=[1]", "loss.reweight_epoch=1",
        "analysis.two_stage_epochs=1", "analysis.tau_steps=3", "analysis.val_per_class=5"]
BASELINE = ["model.num_experts=1", "model.reduce_dimension=false", "model.use_norm=false", "loss.name=ce"]


@pytest.fixture(autouse=True)
def cached_digits(monkeypatch):
    """Read the 5,000 digits once per test session (every command here rebuilds MNIST-LT)."""
    monkeypatch.setattr(mnist_lt, "read_mnist_csv", _read)


@functools.lru_cache(maxsize=1)
def _read_cached(path):
    return _original(path)


_original = mnist_lt.read_mnist_csv


def _read(path):
    images, labels = _read_cached(str(path))
    return images.copy(), labels.copy()


def test_bias_variance_command(tmp_path, capsys):
    args = ["analyze", "bias-variance", "--runs", "2", "--methods", "ce", "--workers", "1", "--out-dir", str(tmp_path),
            *TINY, *["analysis.head_fraction=0.5"]]
    assert main(args) == 0
    data = json.loads((tmp_path / "bias_variance.json").read_text())
    assert data["data"]["train_class_counts"][0] == 245  # half of the 490 non-test digits of a class
    assert data["data"]["test_size"] == 100 and set(data["methods"]) == {"ce"}
    assert (tmp_path / "ce" / "run_001" / "last.pt").is_file() and (tmp_path / "bias_variance.png").is_file()
    assert main(args) == 0  # everything trained already
    assert capsys.readouterr().out.count("done already") >= 2


def test_confusion_two_stage_and_ensemble_commands(tmp_path):
    run = tmp_path / "ce"
    assert main(["train", *TINY, *BASELINE, f"train.out_dir={run}"]) == 0
    ckpt = str(run / "last.pt")
    assert main(["analyze", "confusion", "--checkpoint", ckpt, "--name", "CE", "--bins", "4", "data.test_per_class=10"]) == 0
    assert json.loads((run / "confusion.json").read_text())["models"]["CE"]["splits"]["overall"]["images"] == 100
    for method in ("crt", "tau_norm"):
        assert main(["analyze", "two-stage", "--checkpoint", ckpt, "--method", method, "analysis.two_stage_epochs=1"]) == 0
        assert (run / f"last_{method}.pt").is_file()
    validation = json.loads((run / "last_tau_norm.json").read_text())["validation"]
    assert validation["source"] == "pool+train" and validation["classes_from_training_set"] == [0]  # the head uses all its digits
    assert main(["eval", "--checkpoint", str(run / "last_crt.pt")]) == 0  # the re-balanced model is a normal checkpoint
    out = tmp_path / "ens"
    assert main(["analyze", "ensemble", "--baseline", ckpt, "--baseline", str(run / "last_crt.pt"), "--out-dir", str(out),
                 "data.test_per_class=10"]) == 0
    assert len(json.loads((out / "ensemble.json").read_text())["points"]) == 2


def test_command_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["analyze", "two-stage", "--checkpoint", str(tmp_path / "nope.pt"), "--method", "crt"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["analyze", "bias-variance", "--config", "configs/analysis_mnist_lt.yaml", "--methods", "cee",
                 "--out-dir", str(tmp_path), *TINY]) == 2
    assert "did you mean 'ce'" in capsys.readouterr().err


def test_analyses_refuse_a_checkpoint_without_data_config(tmp_path, capsys):
    """A converted original checkpoint stores no data config: each analysis names the reason and the
    options to pass instead of scoring the default data set; with them it records the data set it scored."""
    net = create_model("resnet32", num_classes=10, num_experts=2)
    ckpt = tmp_path / "converted.pt"
    torch.save({"model": net.state_dict(), "model_args": net.model_args, "router": {}}, ckpt)
    for command in (["confusion", "--checkpoint", str(ckpt)], ["two-stage", "--checkpoint", str(ckpt), "--method", "crt"],
                    ["ensemble", "--ride", str(ckpt), "--out-dir", str(tmp_path / "ens")]):
        assert main(["analyze", *command]) == 2
        err = capsys.readouterr().err
        assert f"{ckpt} stores no data config" in err and f"`ride-fast analyze {command[0]}` cannot tell" in err
        assert "pass the data options, e.g. data.name=" in err
    assert not (tmp_path / "confusion.json").exists() and not (tmp_path / "ens" / "ensemble.json").exists()
    data = ["data.name=mnist_lt", "data.test_per_class=10"]
    assert main(["analyze", "confusion", "--checkpoint", str(ckpt), "--name", "conv", "--bins", "4", *data]) == 0
    assert json.loads((tmp_path / "confusion.json").read_text())["data"] == {"conv": "mnist_lt"}
    assert main(["analyze", "confusion", "--checkpoint", str(ckpt), "--bins", "0", *data]) == 2
    assert "bins must be >= 1, got 0" in capsys.readouterr().err
