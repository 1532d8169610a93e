"""The per-expert classification losses of RIDE (CE, focal, LDAM): each recipe loads and trains a step."""
from pathlib import Path

import pytest
import torch

from ride_fast.config import load_config, update
from ride_fast.engine import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("classification", ["ce", "focal", "ldam"])
def test_expert_loss_recipe_trains_a_step(classification, tmp_path, pool, lt_train):
    cfg = load_config(ROOT / "configs" / f"mnist_lt_ride3_expert_{classification}.yaml")
    assert cfg.loss.name == "ride" and cfg.loss.classification == classification and cfg.model.num_experts == 3
    cfg = update(cfg, data={"batch_size": 16}, train={"epochs": 1, "max_steps_per_epoch": 1, "progress": False,
                                                      "out_dir": str(tmp_path)}, loss={"reweight_epoch": 0})
    trainer = Trainer(cfg, train_set=lt_train, test_set=pool[1], log=lambda s: None)
    assert trainer.criterion.classification == classification
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train_epoch(1)  # epoch 1 > reweight_epoch 0: the DRW phase, class weights on
    assert torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_bias_variance_recipe_loads():
    cfg = load_config(ROOT / "configs" / "analysis_mnist_lt.yaml")
    assert cfg.analysis.methods == ("ce", "ldam", "ride") and cfg.analysis.runs >= 2
