"""Stage 2 (ride_fast.engine.stage2): the class-balanced loader, the router loop (frozen network,
only routers train, loss goes down), the cosine schedule, the routed checkpoint round trip, and
`fit_stage2` as the router config section says (held-out data, calibrated threshold).

Shape legend: N images, C classes, E experts, R = E - 1 routers.
"""
import random

import numpy as np
import pytest
import torch

from ride_fast.config import ConfigError, RouterConfig, config_from_dict, update
from ride_fast.data import ArrayDataset
from ride_fast.engine.checkpoint import ROUTED_KIND, load_checkpoint, load_routed_checkpoint
from ride_fast.engine.stage2 import STAGE2_OPTIONS, RouterTrainer, fit_stage2, router_lr
from ride_fast.models import create_model
from ride_fast.router import Router, routed_forward

C, PX = 6, 8


def tiny_data(n_per_class=(12, 6, 4, 3, 2, 1), seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tiny")


def tiny_cfg(**router):
    return config_from_dict({
        "model": {"channels_last": False},
        "data": {"image_size": PX},
        "router": {"top_k": 4, "batch_size": 8, "epochs": 3, **router},
        "train": {"device": "cpu", "seed": 0},
    })


def tiny_net(E=3, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet32", num_classes=C, num_experts=E)


# --- data ---------------------------------------------------------------------------------------


def test_the_trainer_draws_class_balanced_epochs_of_n_images_in_router_batches():
    from ride_fast.data import ClassBalancedSampler

    data = tiny_data()
    trainer = RouterTrainer(tiny_cfg(batch_size=8), tiny_net(), data, log=lambda s: None)
    assert isinstance(trainer.loader.sampler, ClassBalancedSampler) and len(trainer.loader.sampler) == len(data)
    trainer.loader.set_epoch(1)
    batches = list(trainer.loader)
    assert [b.labels.numel() for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert sum(b.labels.numel() for b in batches) == len(data)
    drawn = []
    for epoch in range(2, 22):
        trainer.loader.set_epoch(epoch)
        drawn += [b.labels for b in trainer.loader]
    share = torch.cat(drawn).bincount(minlength=C) / sum(len(d) for d in drawn)
    torch.testing.assert_close(share, torch.full((C,), 1 / C), atol=0.05, rtol=0)  # tail classes as often as head ones


# --- schedule ---------------------------------------------------------------------------------------


def test_cosine_schedule_per_epoch():
    lrs = [router_lr(e, 0.01, 5) for e in range(1, 7)]
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[2] == pytest.approx(0.01 * (1 + np.cos(2 * np.pi / 5)) / 2)


# --- the loop -----------------------------------------------------------------------------------


def test_router_trainer_freezes_the_network_and_reduces_the_loss():
    data, net = tiny_data(), tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = RouterTrainer(tiny_cfg(epochs=6, lr=0.05), net, data, log=lambda s: None)
    history = trainer.fit()
    assert [h.epoch for h in history] == list(range(1, 7))
    assert history[-1].loss < history[0].loss
    assert history[-1].lr == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 5 / 6)))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the stage-1 network changed (weights or BN statistics)"
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert all(len(h.label_share) == 2 and 0 <= min(h.call_share) <= max(h.call_share) <= 1 for h in history)


def test_router_trainer_refuses_a_single_expert_network():
    with pytest.raises(ValueError, match="at least 2 experts"):
        RouterTrainer(tiny_cfg(), tiny_net(E=1), tiny_data(), log=lambda s: None)


def test_routed_checkpoint_round_trip(tmp_path):
    data, net = tiny_data(), tiny_net()
    trainer = RouterTrainer(tiny_cfg(epochs=1), net, data, log=lambda s: None, stage1_checkpoint="stage1.pt")
    trainer.fit()
    path = trainer.save(tmp_path / "routed.pt")
    assert (tmp_path / "routed_config.yaml").is_file()
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["kind"] == ROUTED_KIND and ckpt["stage1_checkpoint"] == "stage1.pt"
    assert ckpt["router_args"]["top_k"] == 4 and ckpt["config"]["router"]["epochs"] == 1 and len(ckpt["router_history"]) == 1
    net2, router2, _ = load_routed_checkpoint(path)
    x = torch.randn(7, 3, PX, PX)
    a = routed_forward(net.eval(), trainer.router.eval(), x, threshold=0.5)
    b = routed_forward(net2, router2, x, threshold=0.5)
    torch.testing.assert_close(a.logits, b.logits)
    assert torch.equal(a.num_experts, b.num_experts)


def test_a_converted_original_checkpoint_with_router_weights_loads_as_routed(tmp_path):
    from ride_fast.io import atomic_save

    net = tiny_net()
    router = Router(3, net.feature_dim, C, top_k=4)
    original = {f"expert_help_pred_hidden_fcs.{i}.{p}": getattr(router.hidden[i], p).detach() for i in range(2) for p in ("weight", "bias")}
    original |= {f"expert_help_pred_fc.{p}": getattr(router.fc, p).detach() for p in ("weight", "bias")}
    path = atomic_save({"model": net.state_dict(), "model_args": net.model_args, "router": original}, tmp_path / "converted.pt")
    _, loaded, _ = load_routed_checkpoint(path)
    assert loaded.router_args == router.router_args
    for k, v in router.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


# --- the router section's stage-2 options -------------------------------------------------------


def heldout_cfg(**router):
    """The config of the fit_stage2 tests (data of conftest.lt_pool)."""
    return config_from_dict({
        "model": {"channels_last": False},
        "data": {"image_size": PX, "eval_batch_size": 16},
        "router": {"top_k": 4, "batch_size": 8, "epochs": 2, **router},
        "train": {"device": "cpu", "seed": 0},
    })


def test_default_options_are_the_published_stage_2():
    rc = heldout_cfg().router
    assert rc.router_data == "train" and not rc.calibrate_threshold and not rc.uses_heldout
    assert {k: getattr(rc, k) for k in STAGE2_OPTIONS} == {k: getattr(RouterConfig(), k) for k in STAGE2_OPTIONS}


def test_options_are_keys_of_the_router_section():
    rc = heldout_cfg(router_data="heldout", calibrate_threshold=True, max_accuracy_drop=0.5).router
    assert rc.uses_heldout and rc.calibrate_threshold and rc.max_accuracy_drop == 0.5 and rc.threshold == 0.5
    assert heldout_cfg(calibrate_threshold=True).router.uses_heldout  # calibration draws held-out images too
    with pytest.raises(ConfigError, match="router.router_data"):
        heldout_cfg(router_data="val")


@pytest.mark.parametrize("bad", [{"router_data": "val"}, {"threshold": 1.5}, {"heldout_per_class": 0}, {"calibration_per_class": 0},
                                 {"max_accuracy_drop": -1.0}, {"max_accuracy_drop": float("nan")}])
def test_bad_options_name_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"router.{key}"):
        heldout_cfg(**bad)
    with pytest.raises(ConfigError, match=f"router.{key}"):
        RouterConfig(**bad)  # built directly, without the recipe's type checks


# --- the whole stage 2 --------------------------------------------------------------------------


def test_fit_stage2_default_is_the_published_recipe(lt_pool):
    _, train, test = lt_pool
    cfg = heldout_cfg(threshold=0.4)
    result = fit_stage2(cfg, tiny_net().eval(), train, test, log=lambda s: None)
    assert result.threshold == 0.4 and result.calibration is None and result.heldout is None and result.cost is None
    assert result.trainer.class_counts.tolist() == train.class_counts().tolist()
    assert result.info["options"] == {k: getattr(RouterConfig(), k) for k in STAGE2_OPTIONS}


def test_fit_stage2_depends_on_the_seed_not_on_earlier_draws(lt_pool):
    """Two stage 2s of the same network and train.seed give the same routers and threshold, whatever
    the process drew from the global generators in between; another seed gives other routers."""
    pool, train, test = lt_pool
    cfg = heldout_cfg(router_data="heldout", heldout_per_class=6, calibrate_threshold=True, calibration_per_class=4)
    net = tiny_net().eval()
    first = fit_stage2(cfg, net, train, test, log=lambda s: None, pool=pool)
    torch.rand(1000), np.random.rand(1000), random.random()  # what a trainer or a data pipeline would have drawn
    second = fit_stage2(cfg, net, train, test, log=lambda s: None, pool=pool)
    other = fit_stage2(update(cfg, train={"seed": cfg.train.seed + 1}), net, train, test, log=lambda s: None, pool=pool)
    state = lambda r: r.trainer.router.state_dict()  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(state(first).values(), state(second).values()))
    assert first.threshold == second.threshold
    assert not all(torch.equal(a, b) for a, b in zip(state(first).values(), state(other).values()))


def test_fit_stage2_on_heldout_data_with_a_calibrated_threshold(lt_pool, tmp_path):
    pool, train, test = lt_pool
    cfg = heldout_cfg(router_data="heldout", heldout_per_class=6, calibrate_threshold=True, calibration_per_class=4,
                      max_accuracy_drop=0.0)
    result = fit_stage2(cfg, tiny_net().eval(), train, test, log=lambda s: None, pool=pool)
    trainer = result.trainer
    assert len(result.heldout.router) == 30 and trainer.loader.dataset is result.heldout.router  # routers saw held-out images
    assert trainer.class_counts.tolist() == [20, 12, 8, 5, 3, 2]  # the splits stay those of the training set
    assert result.threshold == result.calibration.threshold
    assert trainer.cfg == cfg  # the threshold chosen comes back in the result; the config is not rewritten
    assert result.calibration.routed_accuracy >= result.calibration.all_experts_accuracy - 1e-9
    path = result.save(tmp_path / "routed.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["router"]["threshold"] == result.threshold  # `ride-fast eval` routes with it
    assert "threshold" not in ckpt["stage2"]  # stored once, in the config
    assert ckpt["class_counts"] == [20, 12, 8, 5, 3, 2]
    assert ckpt["stage2"]["calibration"]["threshold"] == result.threshold
    assert ckpt["stage2"]["heldout"]["router_per_class"] == [0, 6, 6, 6, 6, 6]
    assert ckpt["stage2"]["options"]["router_data"] == "heldout" and ckpt["stage2"]["options"]["calibrate_threshold"]
    _, _, again = load_routed_checkpoint(path)
    assert again["config"]["router"]["threshold"] == result.threshold
