"""A batched RIDE-ResNet-32 followed by `RIDELoss` compiles as one graph on the CPU: no graph
break in either DRW phase or diversity mode (the loss is one registered op, and nothing on its
path reads a tensor back to the host).

Shape legend: E experts, B images, C classes. Tiny images (8 x 8) and B = 4 keep it fast.
"""
from __future__ import annotations

import pytest
import torch

from ride_fast.losses import RIDELoss
from ride_fast.models import create_model

COUNTS = [50, 30, 20, 12, 8, 5, 3, 2, 2, 1]  # C = 10
VARIANTS = [(phase, diversity) for phase in (0, 1) for diversity in ("mean", "pairwise")]


def _model_and_data(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = create_model("resnet32", num_classes=len(COUNTS), num_experts=3, batched=True).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, len(COUNTS), (4,), generator=g)
    return model, x.to(device), y.to(device)


def _loss_module(phase, diversity, device="cpu"):
    loss = RIDELoss(COUNTS, diversity=diversity, reweight_epoch=1).to(device)
    loss.set_epoch(1 + phase)  # epoch 1: before the switch; epoch 2: after
    assert loss.phase == phase
    return loss


def test_model_and_loss_have_no_graph_break():
    """torch._dynamo.explain traces every variant (no code generation, so it is quick)."""
    model, x, y = _model_and_data()
    for phase, diversity in VARIANTS:
        loss_mod = _loss_module(phase, diversity)

        def step(x, y, loss_mod=loss_mod):
            return loss_mod(model(x).expert_logits, y)

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(x, y)
        assert explanation.graph_break_count == 0, (phase, diversity, explanation.break_reasons)
        assert explanation.graph_count == 1, (phase, diversity)


def _fullgraph_matches_eager(model, loss_mod, x, y, loss_rtol, grad_rtol, grad_atol_of):
    """torch.compile(fullgraph=True, AOT autograd) of model + loss: the loss and every parameter's
    gradient equal eager's; grad_atol_of(eager gradient) is the absolute tolerance."""

    def step(x, y):
        return loss_mod(model(x).expert_logits, y)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(x, y)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = compiled(x, y)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=loss_rtol, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=grad_rtol, atol=grad_atol_of(g))


@pytest.mark.parametrize("phase,diversity", VARIANTS)
def test_fullgraph_compile_forward_and_backward(phase, diversity):
    """torch.compile(fullgraph=True) runs forward and backward (AOT autograd through the op's
    registered formula) and matches eager."""
    model, x, y = _model_and_data(seed=1)
    _fullgraph_matches_eager(model, _loss_module(phase, diversity), x, y, 1e-5, 1e-4, lambda g: 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("phase,diversity", VARIANTS)
def test_gpu_fullgraph_compile_with_the_triton_kernels(phase, diversity, no_tf32):
    """On CUDA the operator runs the Triton kernels: one graph with no break (fullgraph=True, AOT
    autograd through the op's formula) in every phase and mode, matching eager. TF32 off: with it,
    cuDNN's per-call algorithm choice moves these 8 x 8, batch-4 gradients by more than 1e-3."""
    model, x, y = _model_and_data(seed=2, device="cuda")
    loss_mod = _loss_module(phase, diversity, device="cuda")
    assert loss_mod.path("cuda", torch.float32, 3) == "triton"
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x, y: loss_mod(model(x).expert_logits, y))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # cuDNN may pick other algorithms per call: the gradients' tolerance follows their scale
    _fullgraph_matches_eager(model, loss_mod, x, y, 1e-4, 1e-3, lambda g: 1e-3 * float(g.abs().max()) + 1e-7)
