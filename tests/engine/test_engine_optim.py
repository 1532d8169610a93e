"""The stage-1 optimizer (ride_fast.engine.optim); its layout-independent state is tested with the
checkpoints of both layouts in test_engine_step.py."""
import pytest
import torch

from ride_fast.config import load_config
from ride_fast.engine.optim import build_optimizer

# Fused, foreach and loop SGD on the CPU give torch's for-loop result bit for bit; the bound leaves
# room for a kernel that contracts a multiply-add (a few float32 ulps over three steps), no more.
RTOL, ATOL = 1e-6, 1e-7


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5))
    return net


def _grads(step: int, net) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in net.parameters()]


def _three_steps(net, opt, lrs=(0.1, 0.1, 0.05)):
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(net.parameters(), _grads(step, net)):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_three_steps_equal_torch_nesterov_sgd(impl):
    """Same gradients, same lr schedule: the weights and the momentum buffers after three steps equal
    torch.optim.SGD(momentum, nesterov=True, weight_decay) started from nothing. The buffers that
    build_optimizer creates as zeros must not change the first step (momentum * 0 + grad = grad)."""
    cfg = load_config(overrides=[f"optim.implementation={impl}", "optim.weight_decay=1e-3"]).optim
    net, ref_net = _net(), _net()
    opt = build_optimizer(net, cfg, torch.device("cpu"))
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == cfg.momentum == 0.9
    assert bool(opt.defaults.get("fused")) == (impl == "fused") and bool(opt.defaults.get("foreach")) == (impl == "foreach")
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in net.parameters())  # pre-zeroed
    ref = torch.optim.SGD(ref_net.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    got, want = _three_steps(net, opt), _three_steps(ref_net, ref)
    for a, b, p0 in zip(got, want, _net().parameters()):
        assert not torch.equal(a, p0)  # it moved
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=RTOL, atol=ATOL)


def test_one_step_is_the_nesterov_formula():
    """The first step by hand: d = g + wd p; buf = d; p -= lr (d + momentum buf)."""
    cfg = load_config(overrides=["optim.implementation=auto", "optim.weight_decay=1e-3"]).optim
    net = _net()
    p0 = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(net, cfg, torch.device("cpu"))
    got = _three_steps(net, opt, lrs=(0.1,))
    for a, p, g in zip(got, p0, _grads(0, net)):
        d = g + 1e-3 * p
        torch.testing.assert_close(a, p - 0.1 * (d + 0.9 * d), rtol=RTOL, atol=ATOL)



@pytest.mark.parametrize(("saved", "resumed"), [("foreach", "fused"), ("fused", "foreach"), ("loop", "fused")])
def test_a_resumed_run_keeps_its_own_optimizer_implementation(saved, resumed):
    """A checkpoint of one implementation loaded into an optimizer of another (a CPU run resumed on
    a GPU, or optim.implementation changed): the state is the saved one, the implementation the
    resumed run's, and the step that TrainStep drives (found_inf for the fused SGD) runs."""
    from ride_fast.engine.optim import canonical_optimizer_state, load_canonical_optimizer_state

    def build(impl):
        net = _net()
        return net, build_optimizer(net, load_config(overrides=[f"optim.implementation={impl}"]).optim, torch.device("cpu"))

    net, opt = build(saved)
    _three_steps(net, opt)
    state = canonical_optimizer_state(opt, net)
    net2, opt2 = build(resumed)
    net2.load_state_dict(net.state_dict())
    load_canonical_optimizer_state(opt2, net2, state)
    group = opt2.param_groups[0]
    assert bool(group.get("fused")) == (resumed == "fused") and bool(group.get("foreach")) == (resumed == "foreach")
    assert group["lr"] == 0.05 and all(torch.equal(opt2.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
                                       for p, q in zip(net2.parameters(), net.parameters()))
    for p, g in zip(net2.parameters(), _grads(3, net2)):
        p.grad = g
    if resumed == "fused":
        opt2.found_inf = torch.zeros(())  # as TrainStep drives the fused SGD
    opt2.step()
