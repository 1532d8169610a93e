"""Tiny synthetic data and tiny trained checkpoints shared by the analysis tests (seconds, not minutes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ride_fast.config import load_config
from ride_fast.data import ArrayDataset

NUM_CLASSES = 10
SIZE = 12  # pixels: the CIFAR ResNet-32 family pools adaptively, so 12 x 12 works and is cheap

TINY = ["data.batch_size=16", "data.eval_batch_size=128", "train.max_steps_per_epoch=2", "train.epochs=1",
        "train.progress=false", "optim.warmup_epochs=0", "optim.milestones=[1]", "loss.reweight_epoch=1",
        "router.top_k=5", "router.epochs=1", "router.batch_size=64", "data.imbalance_factor=10"]


def synthetic(per_class: int, seed: int, name: str) -> ArrayDataset:
    """Grey 12 x 12 images: class c lights up the c-th 2 x 2 cell of a 4-wide grid, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    images = rng.integers(0, 60, size=(len(labels), 1, SIZE, SIZE)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 4)
        images[i, 0, 3 * r : 3 * r + 3, 3 * q : 3 * q + 3] = 230
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), NUM_CLASSES, (0.2,), (0.3,), name=name, flip=False)


@pytest.fixture(scope="session")
def pool():
    """(full training data: 40 images per class, balanced test set: 10 per class)."""
    return synthetic(40, 0, "synthetic/pool"), synthetic(10, 1, "synthetic/test")


@pytest.fixture(scope="session")
def lt_train(pool):
    """A long-tailed draw from the pool (24 -> 2 images per class)."""
    from ride_fast.analysis import long_tail_pool

    cfg = tiny_cfg("unused")
    return long_tail_pool(cfg.data, 0.6, pool).draw(0)


def tiny_cfg(out_dir, *extra):
    return load_config(overrides=[*TINY, f"train.out_dir={out_dir}", *extra])


BASELINE = ["model.num_experts=1", "model.reduce_dimension=false", "model.use_norm=false", "loss.name=ce"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, pool, lt_train):
    """Checkpoints: two CE baselines (seeds 0, 1), a 2-expert RIDE, its routed version."""
    from ride_fast.engine import Trainer
    from ride_fast.engine.stage2 import RouterTrainer

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for name, extra in (("ce_a", [*BASELINE, "train.seed=0"]), ("ce_b", [*BASELINE, "train.seed=1"]),
                        ("ride", ["model.num_experts=2"])):
        cfg = tiny_cfg(root / name, *extra)
        trainer = Trainer(cfg, train_set=lt_train, test_set=pool[1], log=lambda s: None)
        trainer.fit()
        out[name] = root / name / "last.pt"
        if name == "ride":
            stage2 = RouterTrainer(cfg, trainer.model, lt_train, log=lambda s: None, stage1_checkpoint=str(out[name]))
            stage2.fit()
            out["routed"] = stage2.save(root / name / "routed.pt")
    return out


@pytest.fixture(scope="session")
def make_cfg():
    """tiny_cfg(out_dir, *overrides): a Config that trains 2 steps of batch 16 for one epoch."""
    return tiny_cfg


@pytest.fixture(scope="session")
def baseline_overrides():
    return list(BASELINE)
