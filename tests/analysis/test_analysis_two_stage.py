import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from ride_fast.analysis import (
    FeatureSet,
    choose_tau,
    run_two_stage,
    tau_normalize,
    train_heads,
    validation_split,
)
from ride_fast.analysis.common import collect_outputs, eval_loader, split_summary
from ride_fast.analysis.frozen_heads import tau_curve
from ride_fast.engine import load_model_from_checkpoint
from ride_fast.models import CosineHead


def linear(weight, bias=None):
    w = torch.tensor(weight, dtype=torch.float32)
    head = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(w)
        if bias is not None:
            head.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return head


def test_tau_normalisation_of_hand_made_weights():
    head = linear([[3.0, 4.0], [0.0, 2.0]], bias=[1.0, -1.0])
    one = tau_normalize(head, 1.0)
    assert one.bias is None  # dropped, as in Kang et al.'s reference code
    assert torch.allclose(one.weight, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    half = tau_normalize(head, 0.5)
    assert torch.allclose(half.weight, torch.tensor([[3.0, 4.0], [0.0, 2.0]]) / torch.tensor([[5.0 ** 0.5], [2.0 ** 0.5]]))
    assert torch.equal(tau_normalize(head, 0.0).weight, head.weight)
    with pytest.raises(TypeError, match="no-op"):
        tau_normalize(CosineHead(2, 2), 1.0)


def test_tau_fixes_a_head_biased_to_the_large_class():
    # class 0 has a long weight vector (the head class), class 1 a short one; features sit in between
    head = linear([[4.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[1.0, 0.0], [0.8, 1.0], [0.7, 1.0], [1.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    val = FeatureSet(feats[None], labels)
    curve = tau_curve([head], val, [0.0, 0.5, 1.0, 1.5])
    assert [acc for _, acc in curve] == [50.0, 50.0, 100.0, 100.0]  # tau = 1 equalises the norms
    assert choose_tau(curve) == 1.0  # 1.0 and 1.5 tie: the smaller wins


def test_choose_tau_prefers_the_smallest_on_ties():
    assert choose_tau([(0.0, 50.0), (0.5, 70.0), (1.0, 70.0), (1.5, 60.0)]) == 0.5


def test_balanced_retraining_learns_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(4, 8) * 3
    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 6 + [3] * 3)  # long-tailed
    feats = centers[labels] + 0.3 * torch.randn(len(labels), 8)
    data = FeatureSet(torch.stack([feats, feats.flip(1)]), labels)  # two experts
    for heads in ([nn.Linear(8, 4), nn.Linear(8, 4)], [CosineHead(8, 4), CosineHead(8, 4)]):
        history = train_heads(heads, data, epochs=8, lr=0.1, batch_size=16)
        assert history[-1]["loss"] < history[0]["loss"]
        with torch.no_grad():
            logits = torch.stack([h(f) for h, f in zip(heads, data.features)]).mean(0)
        assert (logits.argmax(1) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="two_stage_sampler"):
        train_heads([nn.Linear(8, 4)], FeatureSet(feats[None], labels), epochs=1, lr=0.1, sampler="odd")


def test_validation_split_pool_is_unseen_and_train_split_is_stratified(pool, lt_train, make_cfg):
    cfg = make_cfg("x", "analysis.val_per_class=5")
    split = validation_split(cfg, lt_train, pool=pool[0])
    assert split.source == "pool" and split.dataset.class_counts().tolist() == [5] * 10 and split.seen_classes == []
    seen = {bytes(x) for x in lt_train.images.numpy().reshape(len(lt_train), -1)}
    assert not any(bytes(x) in seen for x in split.dataset.images.numpy().reshape(len(split.dataset), -1))
    split = validation_split(cfg, lt_train, source="train")
    counts = lt_train.class_counts()
    assert split.source == "train" and split.dataset.class_counts().tolist() == [min(5, n // 2) for n in counts]
    with pytest.raises(ValueError, match="val_source=pool"):
        validation_split(make_cfg("x", "data.name=imagenet_lt"), lt_train, source="pool")


def test_auto_validation_falls_back_to_training_images_for_classes_without_unused_ones(pool, lt_train, make_cfg):
    cfg = make_cfg("x", "analysis.val_per_class=5")
    head = (pool[0].labels == 0).nonzero().squeeze(1)[: lt_train.class_counts()[0]]
    # a pool whose class 0 holds only training images (as the head class of MNIST-LT / CIFAR-LT)
    rest = (pool[0].labels != 0).nonzero().squeeze(1)
    train0 = lt_train.images[lt_train.labels == 0]
    small = dataclasses.replace(pool[0], images=torch.cat([train0, pool[0].images[rest]]),
                                labels=torch.cat([torch.zeros(len(train0), dtype=torch.long), pool[0].labels[rest]]))
    assert len(head) == len(train0)
    split = validation_split(cfg, lt_train, pool=small)
    assert split.source == "pool+train" and split.seen_classes == [0]
    assert split.dataset.class_counts().tolist() == [5] * 10
    with pytest.raises(ValueError, match=r"classes \[0\] have no image"):
        validation_split(cfg, lt_train, source="pool", pool=small)


def _reloaded_accuracy(path, data, cfg_device="cpu"):
    model, ckpt = load_model_from_checkpoint(path)
    from ride_fast.config import config_from_dict

    cfg = config_from_dict(ckpt["config"])
    out = collect_outputs(model, eval_loader(cfg, data[1], torch.device(cfg_device)))
    return split_summary(out.logits.argmax(1), out.labels, ckpt["class_counts"]), model


@pytest.mark.parametrize("which, method", [("ce_a", "crt"), ("ride", "crt"), ("ce_a", "cosine"), ("ce_a", "tau_norm")])
def test_two_stage_methods_write_a_checkpoint_that_evaluates_the_same(tmp_path, trained, pool, lt_train, which, method):
    data = (lt_train, pool[1])
    result = run_two_stage(trained[which], method, out_dir=tmp_path, datasets=data, pool=pool[0],
                           overrides={"analysis": {"two_stage_epochs": 2, "tau_steps": 5}}, log=lambda s: None)
    stem = f"last_{method}"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["method"] == method and (tmp_path / f"{stem}.png").stat().st_size > 0
    acc, model = _reloaded_accuracy(result.checkpoint, data)
    assert acc.overall == pytest.approx(result.after.overall)
    if method == "cosine":
        assert isinstance(model.heads[0], CosineHead) and model.model_args["use_norm"]
    if method == "tau_norm":
        assert result.tau in np.linspace(0, 2, 5) and report["validation"]["source"] == "pool" and not result.note
        assert torch.equal(model.heads[0].bias, torch.zeros_like(model.heads[0].bias))
        norms = model.heads[0].weight.norm(dim=1)
        if result.tau == 1.0:
            assert torch.allclose(norms, torch.ones_like(norms))
    if method == "crt":
        assert len(result.history) == 2
        # the trunk and experts are untouched
        before, _ = load_model_from_checkpoint(trained[which])
        for (k, v), (k2, v2) in zip(before.state_dict().items(), model.state_dict().items()):
            if not k.startswith("heads."):
                assert torch.equal(v, v2), k


def test_tau_norm_on_cosine_heads_is_a_declared_no_op(tmp_path, trained, pool, lt_train):
    result = run_two_stage(trained["ride"], "tau_norm", out_dir=tmp_path, datasets=(lt_train, pool[1]), log=lambda s: None)
    assert "no-op" in result.note and result.checkpoint == "" and result.tau is None
    assert result.after == result.before
    assert "no-op" in json.loads((tmp_path / "last_tau_norm.json").read_text())["note"]


def test_two_stage_refuses_data_the_checkpoint_was_not_trained_on(tmp_path, trained, pool):
    with pytest.raises(ValueError, match="class counts"):
        run_two_stage(trained["ce_a"], "crt", out_dir=tmp_path, datasets=pool, log=lambda s: None)
    with pytest.raises(ValueError, match="crt, tau_norm, cosine"):
        run_two_stage(trained["ce_a"], "lws", out_dir=tmp_path, datasets=pool, log=lambda s: None)
