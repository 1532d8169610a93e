"""Routed inference: gather the images that continue, run the next expert on them alone, add its
logits back. Checked against a masked dense computation (every expert on every image).

Shape legend: B images, E experts, C classes. Small CIFAR ResNet-32s at 8 px keep this fast; with
BatchNorm in eval mode every image's logits do not depend on the batch it runs in.
"""
import pytest
import torch
from _dispatch import CountOps

from ride_fast.models import create_model
from ride_fast.router import RoutedRIDE, Router, gather_rows, routed_forward

C, PX = 10, 8


def tiny_net(E: int, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resnet32", num_classes=C, num_experts=E).eval()


def images(B: int, seed: int = 1, channels_last: bool = False):
    x = torch.randn(B, 3, PX, PX, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def dense(net, x):
    """Every expert on every image: logits [E, B, C], features [E, B, D]."""
    out = net(x)
    return out.expert_logits, out.features


def masked_reference(expert_logits, keep):
    """Prediction when image b runs expert i+1 iff it ran expert i and keep[i, b]."""
    E, B, _ = expert_logits.shape
    active = torch.ones(E, B, dtype=torch.bool)
    for i in range(1, E):
        active[i] = active[i - 1] & keep[i - 1]
    n = active.sum(0)
    return (expert_logits * active[..., None]).sum(0) / n[:, None], n


def test_forcing_every_expert_gives_the_all_experts_output():
    net, x = tiny_net(3), images(9)
    out = routed_forward(net, None, x, decisions=torch.ones(2, 9, dtype=torch.bool))
    torch.testing.assert_close(out.logits, net(x).logits.detach(), rtol=1e-5, atol=1e-5)
    assert out.num_experts.tolist() == [3] * 9 and out.total_experts == 3
    assert out.routers_evaluated().tolist() == [2] * 9


def test_forcing_no_expert_gives_expert_one_alone():
    net, x = tiny_net(3), images(9)
    out = routed_forward(net, None, x, decisions=torch.zeros(2, 9, dtype=torch.bool))
    with torch.no_grad():
        first, _ = net.forward_expert(0, net.forward_trunk(x))
    torch.testing.assert_close(out.logits, first)
    assert out.num_experts.tolist() == [1] * 9


def test_threshold_one_stops_everyone_and_the_router_module_form_agrees():
    net, x = tiny_net(3), images(5)
    router = Router(3, net.feature_dim, C, top_k=4)
    out = RoutedRIDE(net, router, threshold=1.0)(x)  # sigmoid(r) > 1 never holds
    assert out.num_experts.tolist() == [1] * 5
    torch.testing.assert_close(out.logits, routed_forward(net, None, x, decisions=torch.zeros(2, 5, dtype=torch.bool)).logits)


@pytest.mark.parametrize("E", range(2, 9))
@pytest.mark.parametrize("B", [1, 7])
def test_random_masks_match_the_masked_dense_computation(E, B):
    net, x = tiny_net(E, seed=E), images(B, seed=B)
    z, _ = dense(net, x)
    for trial in range(3):
        keep = torch.rand(E - 1, B, generator=torch.Generator().manual_seed(10 * E + trial)) < 0.6
        out = routed_forward(net, None, x, decisions=keep)
        ref_logits, ref_n = masked_reference(z, keep)
        assert out.num_experts.tolist() == ref_n.tolist()
        torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)


def _record_expert_batches(net):
    """Wrap net.forward_expert to record (expert, images it ran on) per call."""
    calls, forward_expert = [], net.forward_expert

    def recording(i, h):
        calls.append((i, h.shape[0]))
        return forward_expert(i, h)

    net.forward_expert = recording
    return calls


@pytest.mark.parametrize("E", [3, 5])
def test_each_expert_runs_only_on_the_images_that_continue(E):
    """The point of routing: expert i + 1 computes the images still active after expert i and no
    others (a dense pass that masks its result afterwards has the same logits, not the same cost)."""
    net, x = tiny_net(E, seed=E), images(12)
    keep = torch.rand(E - 1, 12, generator=torch.Generator().manual_seed(E)) < 0.6
    calls = _record_expert_batches(net)
    out = routed_forward(net, None, x, decisions=keep)
    active = torch.ones(12, dtype=torch.bool)
    expected = [(0, 12)]
    for i in range(E - 1):
        active = active & keep[i]
        if not active.any():
            break
        expected.append((i + 1, int(active.sum())))
    assert calls == expected
    assert len({n for _, n in calls}) > 2  # the sizes shrink: a real mix of usage
    assert sum(n for _, n in calls) == int(out.num_experts.sum())  # cost = the experts each image used


def test_the_step_where_no_image_continues_stops_the_loop():
    net, x = tiny_net(4), images(6)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[1] = False  # everyone runs experts 1 and 2, nobody expert 3, so nobody can reach expert 4
    out = routed_forward(net, None, x, decisions=keep)
    z, _ = dense(net, x)
    assert out.num_experts.tolist() == [2] * 6
    torch.testing.assert_close(out.logits, z[:2].mean(0), rtol=1e-5, atol=1e-5)


def test_router_decisions_match_a_dense_evaluation_of_the_router():
    E, B = 4, 32
    net, x = tiny_net(E), images(B)
    torch.manual_seed(3)
    router = Router(E, net.feature_dim, C, top_k=5).eval()
    z, f = dense(net, x)
    with torch.no_grad():
        running = z.cumsum(0) / torch.arange(1, E + 1).view(-1, 1, 1)
        probs = torch.sigmoid(torch.stack([router(i, f[i], running[i]) for i in range(E - 1)]))
    threshold = float(probs[0].median())  # about half the images stop after expert 1
    keep = probs > threshold
    ref_logits, ref_n = masked_reference(z, keep)
    out = routed_forward(net, router, x, threshold=threshold)
    assert out.num_experts.tolist() == ref_n.tolist()
    assert 1 < len(set(ref_n.tolist()))  # a real mix of usage
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_channels_last_inputs_give_the_same_result():
    net, keep = tiny_net(3), torch.rand(2, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    a = routed_forward(net, None, images(11), decisions=keep)
    b = routed_forward(net.to(memory_format=torch.channels_last), None, images(11, channels_last=True), decisions=keep)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.num_experts, b.num_experts)


def test_gather_rows_keeps_channels_last():
    x = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([4, 0, 2])
    y = gather_rows(x, idx)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x[idx])
    assert gather_rows(x, torch.empty(0, dtype=torch.long)).shape == (0, 4, 3, 3)


def test_at_most_one_host_sync_per_expert_step():
    E = 4
    net, x = tiny_net(E), images(8)
    router = Router(E, net.feature_dim, C, top_k=5)
    with CountOps() as ops:
        out = routed_forward(net, router, x, threshold=0.0)  # sigmoid > 0: (almost) everyone continues
    syncs = [n for n in ops.names if n.startswith(("nonzero", "_local_scalar_dense", "item", "is_nonzero"))]
    assert len(syncs) <= E - 1, syncs
    assert all(n.startswith("nonzero") for n in syncs), syncs
    assert out.num_experts.max() <= E


def test_bf16_autocast_runs_and_returns_float32_logits():
    net, x = tiny_net(3), images(4)
    router = Router(3, net.feature_dim, C, top_k=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routed_forward(net, router, x)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (4, C)


def test_bad_inputs_are_named():
    net, x = tiny_net(3), images(4)
    with pytest.raises(ValueError, match="needs a router or a decisions tensor"):
        routed_forward(net, None, x)
    with pytest.raises(ValueError, match=r"decisions must be a bool tensor \[E - 1 = 2, B = 4\]"):
        routed_forward(net, None, x, decisions=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for 2 experts but the model has 3"):
        routed_forward(net, Router(2, net.feature_dim, C, top_k=5), x)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        routed_forward(net, Router(3, net.feature_dim, C, top_k=5), x, threshold=1.5)
    with pytest.raises(ValueError, match="does not fit the network"):
        RoutedRIDE(net, Router(3, net.feature_dim + 1, C, top_k=5))


def test_the_grouped_convolution_network_routes_the_same():
    batched = create_model("resnet32", num_classes=C, num_experts=3, batched=True).eval()
    net = tiny_net(3)
    batched.load_state_dict(net.state_dict())
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)) < 0.5
    a = routed_forward(net, None, images(9), decisions=keep)
    b = routed_forward(batched, None, images(9), decisions=keep)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.num_experts, b.num_experts)


def test_routed_inference_turns_the_cudnn_autotuner_off_and_back():
    """Its subsets change size every batch: with the autotuner on (as training leaves it) each new
    size would be tuned anew on a GPU."""
    E = 3
    net, x = tiny_net(E), images(6)
    seen = []
    real = net.forward_expert
    net.forward_expert = lambda i, h: seen.append(torch.backends.cudnn.benchmark) or real(i, h)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        routed_forward(net, None, x, decisions=torch.ones(E - 1, 6, dtype=torch.bool))
        assert seen == [False] * E and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
