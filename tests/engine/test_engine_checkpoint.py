"""Checkpoints (ride_fast.engine.checkpoint): safe reading, atomic writing, one loader for every
checkpoint -> network, and the configs of older checkpoints.

Shape legend: C classes, E experts.
"""
import pickle
import random

import numpy as np
import pytest
import torch

from ride_fast.data import ArrayDataset
from ride_fast.engine import CheckpointError, atomic_save, load_checkpoint
from ride_fast.engine.checkpoint import (checkpoint_config, load_model_from_checkpoint, load_routed_checkpoint, network_from_checkpoint,
                                         rng_state, set_rng_state)
from ride_fast.engine.routed_eval import evaluate_routed_checkpoint
from ride_fast.models import create_model
from ride_fast.router import Router

C, PX = 6, 8


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": {}, "x": object()}, fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"model": {"w": torch.ones(2)}}, path)

    def broken(obj, fh):
        fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_a_checkpoint_without_model_args_is_a_clear_error(tmp_path):
    net = create_model("resnet32", num_classes=C, num_experts=2)
    path = atomic_save({"model": net.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt: no 'model_args' entry"):
        load_model_from_checkpoint(path)
    with pytest.raises(CheckpointError, match="bare.pt: no 'model_args' entry"):
        load_routed_checkpoint(path)


def test_one_loader_builds_either_layout_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=C, num_experts=2)
    path = atomic_save({"model": net.state_dict(), "model_args": net.model_args}, tmp_path / "n.pt")
    per, ckpt = load_model_from_checkpoint(path)
    batched = network_from_checkpoint(ckpt, path, batched=True, channels_last=True)
    assert not per.training and not batched.training and batched.batched and not per.batched
    x = torch.randn(3, 3, PX, PX)
    torch.testing.assert_close(batched(x.to(memory_format=torch.channels_last)).logits, per(x).logits, rtol=1e-4, atol=1e-4)


def tiny_data(seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(C).repeat_interleave(4)
    images = torch.randint(0, 256, (len(labels), 3, PX, PX), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, labels, C, mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny")


def test_a_routed_checkpoint_that_stored_router_calibrate_still_loads(tmp_path):
    """Routed checkpoints written before router.calibrate was named router.calibrate_threshold."""
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=C, num_experts=2)
    router = Router(2, net.feature_dim, C, top_k=4)
    config = {"data": {"image_size": PX}, "train": {"device": "cpu"},
              "router": {"top_k": 4, "threshold": 0.3, "router_data": "heldout", "calibrate": True}}
    path = atomic_save({"kind": "ride_fast.routed", "model": net.state_dict(), "model_args": net.model_args,
                        "router_state": router.state_dict(), "router_args": router.router_args, "config": config,
                        "class_counts": [4] * C, "stage2": {"threshold": 0.3}}, tmp_path / "old_routed.pt")
    cfg = checkpoint_config(load_checkpoint(path))
    assert cfg.router.calibrate_threshold and cfg.router.threshold == 0.3 and cfg.router.router_data == "heldout"
    assert checkpoint_config(load_checkpoint(path), {"router": {"threshold": 0.7}}).router.threshold == 0.7
    report = evaluate_routed_checkpoint(path, datasets=(tiny_data(0), tiny_data(1)), log=lambda s: None)
    assert report.threshold == 0.3 and report.num_images == 4 * C


def test_rng_state_resumes_on_fewer_gpus_than_it_was_saved_on(monkeypatch):
    """A checkpoint holds one CUDA generator state per GPU its process saw; resuming where fewer
    are visible (an elastic restart on a smaller node, a narrower CUDA_VISIBLE_DEVICES) sets the
    ones that exist. Stood in for on the CPU: two saved states, one visible GPU."""
    restored = {}

    def set_cuda_rng_state(state, device):
        if device >= 1:
            raise IndexError(f"no CUDA device {device}")
        restored[device] = state

    state = rng_state()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_cuda_rng_state)
    set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])


def _draws():
    return torch.rand(3), np.random.rand(2), random.random()


def _assert_same_draws(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_a_single_process_rng_state_and_an_older_one_state_checkpoint_still_load():
    """One process stores one state (no "ranks"): every rank of a resumed run restores it."""
    torch.manual_seed(3)
    state = rng_state()
    assert "ranks" not in state
    want = _draws()
    for rank in (0, 1):
        torch.manual_seed(99)
        assert set_rng_state(state, rank=rank)
        _assert_same_draws(_draws(), want)


def test_a_checkpoint_of_two_ranks_resumed_by_another_number_of_ranks():
    """Rank r restores rank r's state while there is one; a rank beyond keeps its own generators."""
    states, want = [], []
    for rank in (0, 1):
        _seed_all(10 + rank)
        states.append(rng_state())
        want.append(_draws())
    saved = {**states[0], "ranks": states}  # as rng_state writes it in a process group of 2
    for rank in (0, 1):
        torch.manual_seed(99)
        assert set_rng_state(saved, rank=rank)
        _assert_same_draws(_draws(), want[rank])
    _seed_all(99)
    assert not set_rng_state(saved, rank=2)  # a third rank: nothing saved for it, its generators stay as seeded
    after = _draws()
    _seed_all(99)
    _assert_same_draws(_draws(), after)
    _seed_all(99)
    assert set_rng_state(saved)  # no process group: this process is rank 0
    _assert_same_draws(_draws(), want[0])


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
