"""`ride-fast eval --checkpoint routed.pt --sweep`: the test set's accuracy-cost curve at every
threshold, printed as a table and written as JSON and PNG; and the timing phase in the report.

Shape legend: N images, C classes, E experts.
"""
import json

import pytest
import torch

from ride_fast.cli import main
from ride_fast.data import ArrayDataset
from ride_fast.engine import routed_eval, stage2
from ride_fast.io import atomic_save
from ride_fast.models import create_model

C, PX = 6, 8


def _data(counts, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny")


def test_eval_sweep_prints_the_curve_and_writes_json_and_png(tmp_path, monkeypatch, capsys):
    train, test = _data((150, 60, 30, 12, 8, 5), 0), _data((5,) * C, 7)
    for module in (stage2, routed_eval):
        monkeypatch.setattr(module, "build_datasets", lambda cfg: (train, test))
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=C, num_experts=3)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args}, tmp_path / "stage1.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  image_size: {PX}\nrouter:\n  top_k: 5\n  epochs: 1\n  batch_size: 64\ntrain:\n  device: cpu\n  out_dir: {tmp_path}\n")
    assert main(["route", "--no-eval", "--config", str(recipe), "--checkpoint", str(stage1), "train.max_steps_per_epoch=2"]) == 0
    capsys.readouterr()
    routed = tmp_path / "routed.pt"
    assert main(["eval", "--checkpoint", str(routed), "--sweep", "router.threshold=0.5"]) == 0
    out = capsys.readouterr().out
    assert "at every threshold" in out and "<- chosen" in out and "batch-1 latency" in out
    sweep = json.loads((tmp_path / "routed_test_sweep.json").read_text())
    assert sweep["threshold"] == 0.5 and sweep["num_images"] == 5 * C
    curve = sweep["curve"]
    assert curve[0]["threshold"] == 1.0 and curve[-1]["threshold"] == 0.0 and curve[-1]["usage"] == [0.0, 0.0, 1.0]
    assert curve[-1]["class_mean_accuracy"] == pytest.approx(sweep["all_experts_class_mean_accuracy"])
    assert curve[-1]["overall"] == pytest.approx(sweep["all_experts_overall"])
    assert "class-mean: the mean of the per-class accuracies" in out and "overall: over the images" in out
    assert (tmp_path / "routed_test_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "routed_test_eval.json").read_text())
    timing = report["timing"]
    assert timing["repeats"] >= 5 and set(timing["images_per_s"]) == {"all_experts", "routed"}
    assert {"p50", "p95"} <= set(timing["latency_ms"]["routed"]) and timing["latency_by_experts"]
    assert report["sweep"]["png"].endswith("routed_test_sweep.png")
    assert main(["eval", "--checkpoint", str(stage1), "--sweep"]) != 0  # a stage-1 checkpoint has no curve
    assert "--sweep needs a routed checkpoint" in capsys.readouterr().err
