"""The stage-1 optimizer (ride_fast.engine.optim); its layout-independent state is tested with the
checkpoints of both layouts in test_engine_step.py."""
import torch

from ride_fast.config import load_config
from ride_fast.engine.optim import build_optimizer


def test_optimizer_is_nesterov_sgd_and_fused_when_asked():
    model = torch.nn.Linear(3, 2)
    cfg = load_config(overrides=["optim.implementation=fused"]).optim
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["nesterov"] and opt.defaults["fused"]
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
