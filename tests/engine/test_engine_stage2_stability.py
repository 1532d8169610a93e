"""Stage 2 on the demo's own data is stable: with the demo's RIDE recipe (routers on held-out
MNIST-LT digits, the published w_on = 100, SGD lr 0.01 with Nesterov and cosine decay), no
router's loss rises by more than half from one epoch to the next.

The stage-1 network is the demo's RIDE model trained for 2 epochs (a weak model has many
positive router labels, which is where the instability showed). On 2 CPU cores the module takes
about a minute: the stage-1 epochs and 5 stage-2 epochs over 900 held-out digits.
"""
import dataclasses
import math

import pytest

from ride_fast.data import build_datasets
from ride_fast.demo import demo_recipes
from ride_fast.engine import Trainer
from ride_fast.engine.stage2 import fit_stage2

RIDE = "RIDE 3 experts (R32)"


@pytest.fixture(scope="module")
def demo_stage1(tmp_path_factory):
    cfg = demo_recipes(2, str(tmp_path_factory.mktemp("demo")))[RIDE]
    train_set, test_set = build_datasets(cfg.data)
    trainer = Trainer(cfg, train_set=train_set, test_set=test_set, log=lambda s: None)
    trainer.fit()
    return cfg, trainer.model, train_set, test_set


def test_no_router_loss_rises_by_half_from_one_epoch_to_the_next(demo_stage1):
    cfg, net, train_set, test_set = demo_stage1
    assert cfg.router.w_on == 100.0 and cfg.router.lr == 0.01 and cfg.router.router_data == "heldout"
    cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, calibrate_threshold=False))  # the loss alone
    lines = []
    result = fit_stage2(cfg, net, train_set, test_set, log=lines.append)
    history = result.trainer.history
    assert len(history) == cfg.router.epochs == 5
    for h in history:
        assert math.isfinite(h.loss) and len(h.router_loss) == len(h.precision) == len(h.recall) == 2
        assert h.loss == pytest.approx(sum(h.router_loss) / 2)
    for before, after in zip(history, history[1:]):
        for r, (a, b) in enumerate(zip(before.router_loss, after.router_loss)):
            assert b <= 1.5 * a, f"router {r + 1}: loss {a:.3f} -> {b:.3f} from epoch {before.epoch} to {after.epoch}: {lines}"
    assert all("precision" in line and "recall" in line for line in lines if line.startswith("router epoch"))
