"""Routed evaluation (docs/method.md §6; ride_fast.engine.routed_eval): the routed report (accuracy,
expert usage per split, MACs against the single-expert baseline, ms per image, JSON and PNG), and
the command line: `ride-fast route`, `ride-fast eval` on a routed checkpoint.

Shape legend: N images, C classes, E experts.
"""
import json
import re

import numpy as np
import pytest
import torch

from ride_fast.data import ArrayDataset, InMemoryLoader
from ride_fast.engine import routed_eval, stage2
from ride_fast.engine.routed_cost import routed_cost
from ride_fast.engine.routed_eval import evaluate_routed, write_report
from ride_fast.io import atomic_save
from ride_fast.models import create_model
from ride_fast.router import Router

C, PX = 6, 8


def tiny_split_data(seed: int) -> ArrayDataset:
    """Training counts 150/60/10/... give many, medium and few classes."""
    counts = (150, 60, 30, 12, 8, 5)
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny")


def tiny_test_data(per_class=5) -> ArrayDataset:
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(C).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny-test")


def tiny_net(E=3):
    torch.manual_seed(0)
    return create_model("resnet32", num_classes=C, num_experts=E).eval()


@pytest.fixture(scope="module")
def report_pair():
    net = tiny_net(3)
    torch.manual_seed(1)
    router = Router(3, net.feature_dim, C, top_k=4)
    loader = InMemoryLoader(tiny_test_data(), 7, train=False)
    counts = tiny_split_data(0).class_counts()
    with torch.no_grad():  # a threshold that splits the images: the median first-router probability
        x = torch.cat([b.images for b in loader])
        out = net(x)
        probs = torch.sigmoid(router(0, out.features[0], out.expert_logits[0]))
    mixed = evaluate_routed(net, router, loader, counts, image_size=PX, threshold=float(probs.median()))
    cost = routed_cost(net, router, PX)  # counted once more here, reused below (fvcore traces are slow)
    assert cost == mixed.cost
    stop = evaluate_routed(net, router, loader, counts, image_size=PX, threshold=1.0, cost=cost, baseline=mixed.baseline_macs)
    return net, mixed, stop


def test_report_usage_macs_and_times(report_pair):
    net, mixed, stop = report_pair
    cost = mixed.cost.as_dict()
    assert mixed.num_images == 5 * C and mixed.num_experts == 3
    for split in ("overall", "many", "medium", "few"):
        assert sum(mixed.usage[split]) == pytest.approx(1.0)
    usage = np.asarray(mixed.usage["overall"])
    assert usage[0] > 0 and usage[1:].sum() > 0
    expected = sum(u * m for u, m in zip(usage, cost["macs_with_k_experts_and_routers"]))
    assert mixed.mean_macs == pytest.approx(expected)
    assert cost["macs_with_k_experts"][0] < mixed.mean_macs_network < mixed.all_experts_macs
    assert mixed.all_experts_macs == cost["macs_with_k_experts"][-1]
    assert mixed.macs_ratio_to_baseline == pytest.approx(mixed.mean_macs / mixed.baseline_macs)
    assert mixed.ms_per_image["routed"] > 0 and mixed.ms_per_image["all_experts"] > 0
    # threshold 1: nobody continues; routed = expert 1 alone, one expert and one router per image
    assert stop.usage["overall"] == [1.0, 0.0, 0.0]
    assert stop.mean_macs == cost["macs_with_k_experts_and_routers"][0]
    assert stop.all_experts.overall == mixed.all_experts.overall


def test_report_json_and_png(report_pair, tmp_path):
    """The file holds the report's own numbers (read back from disk, compared with the report object,
    not with what the writer returned)."""
    _, mixed, _ = report_pair
    write_report(mixed, tmp_path / "r.json", tmp_path / "r.png", extra={"checkpoint": "c.pt"})
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert (on_disk["threshold"], on_disk["num_images"], on_disk["num_experts"]) == (mixed.threshold, 5 * C, 3)
    assert on_disk["checkpoint"] == "c.pt" and on_disk["usage_plot"] == str(tmp_path / "r.png")
    for split in ("overall", "many", "medium", "few"):
        assert on_disk["expert_usage"][split] == {str(k + 1): pytest.approx(u) for k, u in enumerate(mixed.usage[split])}
        assert on_disk["mean_experts_per_image"][split] == pytest.approx(mixed.mean_experts[split])
        for name, acc in (("all_experts", mixed.all_experts), ("routed", mixed.routed)):
            assert on_disk["accuracy"][name][split] == pytest.approx(getattr(acc, split))
    assert on_disk["per_class_accuracy"]["routed"] == pytest.approx(list(mixed.routed.per_class), nan_ok=True)
    macs = on_disk["macs"]
    assert macs["routed_mean_per_image"] == pytest.approx(mixed.mean_macs)
    assert macs["routed_mean_per_image_without_routers"] == pytest.approx(mixed.mean_macs_network)
    assert macs["all_experts_per_image"] == mixed.all_experts_macs == mixed.cost.macs_with(3, routers=False)
    assert macs["single_expert_baseline_per_image"] == mixed.baseline_macs
    assert macs["routed_ratio_to_baseline"] == pytest.approx(mixed.mean_macs / mixed.baseline_macs)
    assert macs["parts"]["macs_with_k_experts_and_routers"] == [mixed.cost.macs_with(n) for n in (1, 2, 3)]
    assert on_disk["ms_per_image"] == pytest.approx(mixed.ms_per_image)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routed" in mixed.summary() and "experts used" in mixed.summary()


def test_route_and_eval_commands_end_to_end(tmp_path, monkeypatch, capsys):
    from ride_fast.cli import main

    for module in (stage2, routed_eval):
        monkeypatch.setattr(module, "build_datasets", lambda cfg: (tiny_split_data(0), tiny_test_data()))
    net = tiny_net(2)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args}, tmp_path / "stage1.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  image_size: {PX}\nrouter:\n  top_k: 5\n  epochs: 1\n  batch_size: 64\ntrain:\n  device: cpu\n  out_dir: {tmp_path}\n")
    assert main(["route", "--no-eval", "--config", str(recipe), "--checkpoint", str(stage1), "train.max_steps_per_epoch=2"]) == 0
    routed = tmp_path / "routed.pt"
    assert routed.is_file() and (tmp_path / "routed_config.yaml").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(routed), "--json", str(tmp_path / "again.json"), "router.threshold=1.0"]) == 0
    out = capsys.readouterr().out
    assert "routed" in out and "all experts" in out
    report = json.loads((tmp_path / "again.json").read_text())
    assert report["threshold"] == 1.0 and report["expert_usage"]["overall"] == {"1": 1.0, "2": 0.0}
    assert (tmp_path / "again_usage.png").is_file()


def test_eval_keeps_routes_report_and_names_its_data(tmp_path, monkeypatch, capsys):
    """`ride-fast eval` on a routed checkpoint writes its own <stem>_test_eval.json: route's
    routed_eval.json (with its stage2 record) stays byte for byte; both name the data they scored."""
    from ride_fast.cli import main

    for module in (stage2, routed_eval):
        monkeypatch.setattr(module, "build_datasets", lambda cfg: (tiny_split_data(0), tiny_test_data()))
    net = tiny_net(2)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args}, tmp_path / "stage1.pt")
    assert main(["route", "--checkpoint", str(stage1), f"data.image_size={PX}", "router.top_k=5", "router.epochs=1",
                 "router.batch_size=64", "train.device=cpu", f"train.out_dir={tmp_path}", "train.max_steps_per_epoch=2"]) == 0
    route_report = (tmp_path / "routed_eval.json").read_bytes()
    assert "stage2" in json.loads(route_report)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "routed.pt"), "router.threshold=0.2", "router.top_k=3"]) == 0
    out = capsys.readouterr().out
    n = len(tiny_test_data())
    assert f"routed.pt on mnist_lt, test split, {n:,} images:" in out
    assert "warning: router.top_k does not apply" in out and "router.threshold does not apply" not in out
    assert (tmp_path / "routed_eval.json").read_bytes() == route_report
    mine = json.loads((tmp_path / "routed_test_eval.json").read_text())
    assert mine["data"] == {"name": "mnist_lt", "root": "", "split": "test", "num_images": n}
    assert mine["checkpoint"] == str(tmp_path / "routed.pt") and mine["threshold"] == 0.2
    assert (tmp_path / "routed_test_usage.png").is_file()


def test_eval_prints_before_it_writes_and_splits_by_the_checkpoints_counts(tmp_path, monkeypatch, capsys):
    """The numbers come first, so a report that cannot be written loses none of them; the many / medium /
    few splits are those of the training set the checkpoint learned from, with a warning when the
    training set rebuilt from the data options has other class counts."""
    from ride_fast.cli import main

    for module in (stage2, routed_eval):
        monkeypatch.setattr(module, "build_datasets", lambda cfg: (tiny_split_data(0), tiny_test_data()))
    net = tiny_net(2)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args}, tmp_path / "stage1.pt")
    assert main(["route", "--no-eval", "--checkpoint", str(stage1), f"data.image_size={PX}", "router.top_k=5", "router.epochs=1",
                 "router.batch_size=64", "train.device=cpu", f"train.out_dir={tmp_path}", "train.max_steps_per_epoch=2"]) == 0
    routed = str(tmp_path / "routed.pt")
    flat = tiny_split_data(0)
    flat = ArrayDataset(flat.images, torch.arange(len(flat.labels)) % C, C, mean=flat.mean, std=flat.std, name="tiny")  # 44 per class: all medium
    monkeypatch.setattr(routed_eval, "build_datasets", lambda cfg: (flat, tiny_test_data()))
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", routed, "--json", str(tmp_path / "a_file" / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "warning: the training set built from the data options has other class counts than" in out
    assert "(class 0: 45 images, trained with 150)" in out
    assert "routed" in out and "all experts" in out and "experts used" in out  # the summary, before the failed write
    assert f"cannot write {tmp_path / 'a_file'}" in err and f": {tmp_path / 'a_file'} is a file, not a folder" in err
    assert "Error" not in err and "Traceback" not in err
    assert main(["eval", "--checkpoint", routed, "--json", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path}: it is a folder; give a file path" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", routed, "--json", str(tmp_path / "r.json")]) == 0
    accuracy = json.loads((tmp_path / "r.json").read_text())["accuracy"]["routed"]
    assert all(accuracy[split] is not None for split in ("many", "medium", "few"))  # the checkpoint's 150/60/30/12/8/5


def test_route_takes_architecture_data_and_router_section_from_the_checkpoint(tmp_path, monkeypatch):
    """No --config: the stage-1 checkpoint's data and router sections are used; a recipe changes only the keys it sets."""
    from ride_fast.cli import main

    seen = []

    def fake_datasets(cfg):
        seen.append(cfg)
        return tiny_split_data(0), tiny_test_data()

    monkeypatch.setattr(stage2, "build_datasets", fake_datasets)
    net = tiny_net(2)
    config = {"data": {"name": "cifar10_lt", "image_size": PX, "imbalance_factor": 10.0},
              "router": {"top_k": 5, "epochs": 1, "batch_size": 64}, "train": {"device": "cpu", "out_dir": str(tmp_path)}}
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args, "config": config}, tmp_path / "stage1.pt")
    assert main(["route", "--no-eval", "--checkpoint", str(stage1), "train.max_steps_per_epoch=1"]) == 0
    data = seen[-1]
    assert (data.name, data.image_size, data.imbalance_factor) == ("cifar10_lt", PX, 10.0)
    routed = torch.load(tmp_path / "routed.pt", weights_only=True)
    assert routed["config"]["router"]["top_k"] == 5 and routed["config"]["model"]["num_experts"] == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text("router:\n  hidden: 4\n")
    assert main(["route", "--no-eval", "--config", str(recipe), "--checkpoint", str(stage1), "--out", str(tmp_path / "b.pt"),
                 "train.max_steps_per_epoch=1"]) == 0
    assert seen[-1].name == "cifar10_lt"  # the recipe sets no data key: the checkpoint's data stays
    routed = torch.load(tmp_path / "b.pt", weights_only=True)
    assert routed["config"]["router"]["hidden"] == 4 and routed["config"]["router"]["top_k"] == 5


def test_route_warns_about_model_keys_the_checkpoint_overrules(tmp_path, monkeypatch, capsys):
    """model.num_experts=3 on a 2-expert checkpoint is not silently dropped: a warning names the key and both values."""
    from ride_fast.cli import main

    def stop(cfg):
        raise ValueError("stopped after the config")

    monkeypatch.setattr(stage2, "build_datasets", stop)
    net = tiny_net(2)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args,
                          "config": {"data": {"image_size": PX}, "router": {"top_k": 5}}}, tmp_path / "stage1.pt")
    assert main(["route", "--checkpoint", str(stage1), "model.num_experts=3", "model.use_norm=true", "model.batched=false"]) == 2
    out = capsys.readouterr().out
    assert f"warning: model.num_experts=3 does not apply to `ride-fast route`: the architecture comes from {stage1} " \
           "(model.num_experts=2); ignored" in out
    assert "model.use_norm" not in out and "model.batched" not in out  # the checkpoint's own value; a speed switch


def test_route_names_the_checkpoint_and_the_fix_when_the_data_has_other_classes(tmp_path, monkeypatch, capsys):
    from ride_fast.cli import main

    ten = ArrayDataset(torch.zeros(10, 3, PX, PX, dtype=torch.uint8), torch.arange(10), 10, mean=(0.5,) * 3, std=(0.25,) * 3, name="ten")
    monkeypatch.setattr(stage2, "build_datasets", lambda cfg: (ten, ten))
    net = tiny_net(2)
    stage1 = atomic_save({"model": net.state_dict(), "model_args": net.model_args,
                          "config": {"data": {"image_size": PX}, "router": {"top_k": 5}}}, tmp_path / "stage1.pt")
    assert main(["route", "--checkpoint", str(stage1), "data.name=mnist_lt"]) == 2
    assert f"{stage1}: the network has {C} classes but data mnist_lt has 10; pass the data the checkpoint was trained on " \
           "(e.g. data.name=... data.root=...)" in capsys.readouterr().err


@pytest.mark.parametrize("experts, overrides, message", [
    (1, [], r"stage 2 routes between experts, and this checkpoint has 1 \(model\.num_experts=1\)"),
    (2, ["router.top_k=7"], r"router\.top_k=7 must lie in 1\.\.6"),
    (2, ["data.name=image_list", "router.router_data=heldout"], r"router\.router_data=heldout needs images .*data\.name=image_list"),
    (None, [], r"stores no data config .* pass the data options, e.g\. data\.name="),
])
def test_route_checks_everything_before_any_work(tmp_path, monkeypatch, capsys, experts, overrides, message):
    """Each failure comes before the data is built and before the stage-2 start line; messages name config keys."""
    from ride_fast.cli import main

    def refuse(cfg):
        raise AssertionError("route built its data before the checks")

    monkeypatch.setattr(stage2, "build_datasets", refuse)
    net = tiny_net(experts or 2)
    state = {"model": net.state_dict(), "model_args": net.model_args}
    if experts is not None:
        state["config"] = {"data": {"image_size": PX}, "router": {"top_k": 5}}
    stage1 = atomic_save(state, tmp_path / "stage1.pt")
    assert main(["route", "--checkpoint", str(stage1), *overrides]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and "stage 2" not in captured.out
    assert "Options" not in captured.err and "Config" not in captured.err  # keys, not class names


def test_route_help_explains_the_stage2_columns(capsys):
    from ride_fast.cli import main

    with pytest.raises(SystemExit):
        main(["route", "--help"])
    out = capsys.readouterr().out
    assert "--config" in out and "come from the checkpoint" in " ".join(out.split())
    for column in ("loss", "positive", "called", "precision", "recall"):
        assert re.search(rf"^  {column} +\S", out, re.M), f"route --help does not explain the column {column!r}"
