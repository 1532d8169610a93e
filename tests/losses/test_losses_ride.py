"""RIDELoss against an independent loop-per-expert transcription of docs/method.md §3 (float64).

The transcription follows the original code: precompute margins / weights / temperatures with
numpy, then per expert subtract s*m_y from the target logit, F.cross_entropy(weight=...), and the
diversity KL with F.kl_div(..., reduction="batchmean"); "pairwise" is an explicit double loop.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ride_fast.losses.ride as ride_module
from ride_fast.losses import RIDELoss
from ride_fast.losses.synthetic import ride_loss_inputs

COUNTS = [500, 210, 90, 37, 16, 7, 3]  # C = 7 (odd, not a power of two)


def ride_loss_loop_from_counts(
    expert_logits,
    target,
    class_counts,
    epoch,
    max_m=0.5,
    s=30.0,
    diversity_factor=-0.45,
    reweight_epoch=160,
    reweight_factor=0.05,
    base_temperature=1.0,
    diversity="mean",
    individual=True,
    classification="ldam",
    reweight=True,
    beta=0.9999,
    zero_diversity_on_mean_logits=False,
):
    """The whole RIDELoss as the original code computes it, from the class counts and the epoch:
    numpy margins / weights / temperatures, the DRW phase, then a loop over experts (float64
    spec check of the module; every option RIDELoss has). zero_diversity_on_mean_logits: the
    original's choice of logits for each expert's term, the mean logits when the factor is 0."""
    n = np.asarray(class_counts, dtype=np.float64)
    C = n.shape[0]
    dt = expert_logits.dtype
    m_list = 1.0 / np.sqrt(np.sqrt(n))
    m_list = torch.tensor(m_list * (max_m / np.max(m_list)), dtype=dt)
    effective_num = 1.0 - np.power(beta, n)
    w = (1.0 - beta) / effective_num
    w = torch.tensor(w / np.sum(w) * C, dtype=dt)
    p = n / np.sum(n)
    t = C * p * reweight_factor + 1 - reweight_factor
    t = torch.tensor(t / np.max(t), dtype=dt)

    drw = reweight and reweight_epoch != -1 and epoch > reweight_epoch
    weight = w if drw else None
    if drw:
        T = base_temperature * t.view(1, -1)
        Tm = T.mean().item()
    else:
        T = base_temperature
        Tm = base_temperature

    E = expert_logits.shape[0]
    output_logits = expert_logits.mean(0)

    def classify(x):
        if classification == "ldam":
            index = torch.zeros_like(x, dtype=torch.bool)
            index.scatter_(1, target.view(-1, 1), True)
            batch_m = (m_list[None, :] @ index.to(dt).t()).view(-1, 1)
            x = torch.where(index, x - batch_m * s, x)
        return F.cross_entropy(x, target, weight=weight)

    loss = 0
    if not individual and not (zero_diversity_on_mean_logits and diversity_factor == 0):
        loss = loss + classify(output_logits)  # collaborative: once, on the mean logits
    for k in range(E):
        logits_item = expert_logits[k]
        if zero_diversity_on_mean_logits and diversity_factor == 0:
            loss = loss + classify(output_logits)  # the original's ride_loss_logits at a zero factor
        elif individual:
            loss = loss + classify(logits_item)
        if diversity == "mean":
            output_dist = F.log_softmax(logits_item / T, dim=1)
            with torch.no_grad():
                mean_output_dist = F.softmax(output_logits / T, dim=1)
            loss = loss + diversity_factor * Tm * Tm * F.kl_div(output_dist, mean_output_dist, reduction="batchmean")
        else:
            for j in range(E):
                if j == k:
                    continue
                log_qj = F.log_softmax(expert_logits[j] / T, dim=1)
                q_k = F.softmax(logits_item / T, dim=1)
                # KL(q_k || q_j) = kl_div(input=log q_j, target=q_k)
                kl = F.kl_div(log_qj, q_k, reduction="batchmean")
                loss = loss + diversity_factor * Tm * Tm / (E - 1) * kl
    return loss


def _inputs(E, B, C, dtype=torch.float64, seed=0, scale=10.0):
    inp = ride_loss_inputs(E, B, C, dtype=dtype, seed=seed, scale=scale, confident=False)
    return inp.logits, inp.target


@pytest.mark.parametrize("E", [1, 2, 3, 4])
@pytest.mark.parametrize("epoch", [160, 161])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("individual", [True, False])
def test_matches_loop_transcription_value_and_grad(E, epoch, diversity, individual):
    logits, target = _inputs(E, 9, len(COUNTS), seed=E * 100 + epoch)
    kwargs = dict(diversity=diversity, individual=individual)
    loss_mod = RIDELoss(COUNTS, impl="reference", **kwargs)
    loss_mod.set_epoch(epoch)
    assert loss_mod.phase == int(epoch > 160)

    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = loss_mod(x1, target)
    ref = ride_loss_loop_from_counts(x2, target, COUNTS, epoch, **kwargs)
    assert ours.dtype == torch.float64
    # the module's buffers are float32: agreement to ~1e-7 relative
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(ours, x1)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("epoch", [160, 161])
@pytest.mark.parametrize("classification", ["ldam", "ce"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_zero_diversity_on_mean_logits_is_the_originals_loss_at_a_zero_factor(E, epoch, classification, impl):
    """The original at lambda = 0 exactly: every expert's term on the mean logits, E copies."""
    logits, target = _inputs(E, 9, len(COUNTS), seed=E * 10 + epoch)
    loss_mod = RIDELoss(COUNTS, diversity_factor=0.0, zero_diversity_on_mean_logits=True, classification=classification, impl=impl)
    loss_mod.set_epoch(epoch)
    assert loss_mod.per_expert_terms is False  # the dispatch takes the path that covers it
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = loss_mod(x1, target)
    ref = ride_loss_loop_from_counts(x2, target, COUNTS, epoch, diversity_factor=0.0, classification=classification,
                                     zero_diversity_on_mean_logits=True)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(ref, x2)[0], rtol=1e-6, atol=1e-7)
    if E > 1:  # not the default: individual terms, a different loss
        plain = RIDELoss(COUNTS, diversity_factor=0.0, classification=classification, impl=impl)
        plain.set_epoch(epoch)
        assert plain.per_expert_terms and not torch.allclose(plain(logits, target), ours.detach())


def test_zero_diversity_on_mean_logits_changes_nothing_at_a_nonzero_factor():
    logits, target = _inputs(3, 9, len(COUNTS), seed=5)
    on = RIDELoss(COUNTS, diversity_factor=-0.45, zero_diversity_on_mean_logits=True)
    off = RIDELoss(COUNTS, diversity_factor=-0.45)
    assert on.per_expert_terms and torch.equal(on(logits, target), off(logits, target))


def test_the_config_switch_reaches_the_loss_and_its_dispatch():
    from ride_fast.config import load_config
    from ride_fast.losses import build_loss
    from ride_fast.losses.factory import loss_path

    cfg = load_config(overrides=["loss.diversity_factor=0", "loss.zero_diversity_on_mean_logits=true"])
    loss_mod = build_loss(cfg.loss, COUNTS)
    assert loss_mod.zero_diversity_on_mean_logits and loss_path(loss_mod, torch.device("cpu"), 3, len(COUNTS)) == "reference"
    default = build_loss(load_config(overrides=["loss.diversity_factor=0"]).loss, COUNTS)
    assert loss_path(default, torch.device("cpu"), 3, len(COUNTS)) == "analytic"


@pytest.mark.parametrize("classification", ["ldam", "ce"])
@pytest.mark.parametrize("base_temperature", [1.0, 2.0])
@pytest.mark.parametrize("reweight", [True, False])
def test_matches_loop_transcription_options(classification, base_temperature, reweight):
    E, epoch = 3, 7
    logits, target = _inputs(E, 6, len(COUNTS), seed=11)
    kwargs = dict(
        classification=classification,
        base_temperature=base_temperature,
        reweight=reweight,
        reweight_epoch=5,
        reweight_factor=0.3,
        diversity_factor=-0.2,
        max_m=0.4,
        s=16.0,
        beta=0.999,
    )
    loss_mod = RIDELoss(COUNTS, impl="reference", **kwargs)
    loss_mod.set_epoch(epoch)
    assert loss_mod.phase == int(reweight)
    torch.testing.assert_close(loss_mod(logits, target), ride_loss_loop_from_counts(logits, target, COUNTS, epoch, **kwargs), rtol=1e-6, atol=1e-6)


def test_hand_checked_two_classes_one_expert():
    # C = 2, E = 1, counts [100, 1], s = 1, max_m = 0.5 -> margins [0.5/sqrt(10), 0.5].
    # One image of class 1 with logits [0, 1]: the margin makes the target logit 1 - 0.5 = 0.5, so
    #   LDAM = -log(e^0.5 / (e^0 + e^0.5)) = log(1 + e^-0.5).
    # With E = 1 the mean distribution equals the expert's, so the diversity KL is 0.
    loss_mod = RIDELoss([100, 1], s=1.0, impl="reference")
    value = loss_mod(torch.tensor([[[0.0, 1.0]]], dtype=torch.float64), torch.tensor([1]))
    assert value.item() == pytest.approx(math.log(1.0 + math.exp(-0.5)), rel=1e-12)


def test_hand_checked_diversity_two_experts():
    # C = 2, E = 2, one image of class 0, classification without margins ("ce"), lambda = -1, T = 1.
    # z_1 = [0, 0] (q_1 = [1/2, 1/2]), z_2 = [log 3, 0] (q_2 = [3/4, 1/4]); zbar = [log 3 / 2, 0]:
    #   pbar = [sqrt3/(1+sqrt3), 1/(1+sqrt3)].
    # CE: -log(1/2) + -log(3/4) = log 2 + log 4/3.
    # diversity = -1 * [KL(pbar||q_1) + KL(pbar||q_2)] with KL(p||q) = sum_c p_c log(p_c/q_c).
    z = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)
    a = math.sqrt(3.0)
    pbar = [a / (1 + a), 1 / (1 + a)]
    kl = lambda p, q: sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))  # noqa: E731
    expected = math.log(2.0) + math.log(4.0 / 3.0) - (kl(pbar, [0.5, 0.5]) + kl(pbar, [0.75, 0.25]))
    loss_mod = RIDELoss([10, 10], classification="ce", diversity_factor=-1.0, impl="reference")
    assert loss_mod(z, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)


def test_phase_switch_and_op_arguments(monkeypatch):
    calls = []

    def fake_op(expert_logits, target, **kw):
        calls.append(kw)
        return expert_logits.sum() * 0

    monkeypatch.setattr(ride_module, "_ride_loss_checked", fake_op)
    loss_mod = RIDELoss(COUNTS, reweight_epoch=160, base_temperature=1.5, diversity_factor=-0.3, impl="reference")
    logits, target = _inputs(2, 4, len(COUNTS), dtype=torch.float32)
    C = len(COUNTS)

    assert loss_mod.phase == 0  # a fresh loss is at epoch 1
    loss_mod.set_epoch(160)
    assert loss_mod.phase == 0
    loss_mod(logits, target)
    kw = calls[-1]
    assert kw["class_weights"] is None
    torch.testing.assert_close(kw["temperature"], torch.full((C,), 1.5))
    assert kw["temperature_mean"] == 1.5
    assert isinstance(kw["temperature_mean"], float)  # a host number, never a device tensor
    m = np.asarray(COUNTS, dtype=np.float64) ** -0.25
    torch.testing.assert_close(kw["margins"], torch.tensor(30.0 * 0.5 * m / m.max(), dtype=torch.float32))
    assert kw["diversity_factor"] == -0.3 and kw["diversity"] == "mean" and kw["individual"] is True
    assert kw["impl"] == "reference"

    loss_mod.set_epoch(161)
    assert loss_mod.phase == 1
    loss_mod(logits, target)
    kw = calls[-1]
    n = np.asarray(COUNTS, dtype=np.float64)
    w = (1 - 0.9999) / (1 - 0.9999**n)
    t = C * n / n.sum() * 0.05 + 0.95
    t = 1.5 * t / t.max()
    torch.testing.assert_close(kw["class_weights"], torch.tensor(w / w.sum() * C, dtype=torch.float32))
    torch.testing.assert_close(kw["temperature"], torch.tensor(t, dtype=torch.float32))
    assert kw["temperature_mean"] == pytest.approx(t.mean(), rel=1e-12)
    assert loss_mod.temperature_mean == kw["temperature_mean"]

    loss_mod.set_epoch(3)  # and back (e.g. a restart)
    assert loss_mod.phase == 0 and loss_mod.class_weights is None


def test_no_switch_when_reweight_off_or_never(monkeypatch):
    for kwargs in (dict(reweight=False), dict(reweight_epoch=-1)):
        loss_mod = RIDELoss(COUNTS, **kwargs)
        loss_mod.set_epoch(10_000)
        assert loss_mod.phase == 0 and loss_mod.class_weights is None
    loss_mod = RIDELoss(COUNTS, reweight_epoch=0)
    assert loss_mod.phase == 1  # epoch 1 > 0
    assert RIDELoss(COUNTS, classification="ce").margins is None


@pytest.mark.parametrize("epoch", [1, 200])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("individual", [True, False])
def test_gradcheck(epoch, diversity, individual):
    loss_mod = RIDELoss(COUNTS[:5], s=3.0, diversity_factor=-0.45, diversity=diversity, individual=individual, impl="reference")
    loss_mod.set_epoch(epoch)
    logits, target = _inputs(3, 4, 5, scale=1.0, seed=epoch)
    assert torch.autograd.gradcheck(lambda x: loss_mod(x, target), (logits.requires_grad_(True),))


def test_focal_classification_matches_ce_at_gamma_zero_and_gradchecks():
    logits, target = _inputs(3, 8, len(COUNTS), seed=5)
    for epoch in (1, 200):
        for individual in (True, False):
            for diversity in ("mean", "pairwise"):
                kw = dict(diversity=diversity, individual=individual, impl="reference")
                focal = RIDELoss(COUNTS, classification="focal", focal_gamma=0.0, **kw)
                ce = RIDELoss(COUNTS, classification="ce", **kw)
                focal.set_epoch(epoch)
                ce.set_epoch(epoch)
                torch.testing.assert_close(focal(logits, target), ce(logits, target), rtol=1e-12, atol=1e-12)
    focal = RIDELoss(COUNTS[:5], classification="focal", focal_gamma=2.0, reweight_epoch=1)
    focal.set_epoch(2)
    small, t = _inputs(2, 4, 5, scale=1.0)
    assert torch.autograd.gradcheck(lambda x: focal(x, t), (small.requires_grad_(True),))


def test_focal_classification_value():
    # focal term written out per expert + the diversity term of the "ce" variant
    logits, target = _inputs(2, 6, len(COUNTS), seed=9)
    gamma = 1.5
    focal = RIDELoss(COUNTS, classification="focal", focal_gamma=gamma)
    ce = RIDELoss(COUNTS, classification="ce", impl="reference")
    for epoch in (1, 161):
        focal.set_epoch(epoch)
        ce.set_epoch(epoch)
        w = ce.class_weights
        expected = ce(logits, target)
        for k in range(2):
            nll = F.cross_entropy(logits[k], target, reduction="none")
            fl = (1 - torch.exp(-nll)) ** gamma * nll
            wk = torch.ones_like(nll) if w is None else w.double()[target]
            expected = expected - (wk * nll).sum() / wk.sum() + (wk * fl).sum() / wk.sum()
        torch.testing.assert_close(focal(logits, target), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("classification", ["ldam", "focal"])
def test_bf16_logits_computed_in_float32(classification):
    logits, target = _inputs(3, 16, len(COUNTS), dtype=torch.float32, seed=3)
    loss_mod = RIDELoss(COUNTS, classification=classification, impl="reference")
    loss_mod.set_epoch(200)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    out = loss_mod(x, target)
    assert out.dtype == torch.float32
    ref = loss_mod(logits.to(torch.bfloat16).float(), target)  # same rounded inputs, float32 math
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    out.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_buffers_follow_the_module_and_are_not_in_the_state_dict():
    loss_mod = RIDELoss(COUNTS)
    names = {name for name, _ in loss_mod.named_buffers()}
    assert {"margins", "drw_weights", "temperature_base", "temperature_drw"} <= names
    assert loss_mod.state_dict() == {}
    moved = loss_mod.to(torch.float64)
    assert moved.margins.dtype == torch.float64


def test_constructor_errors():
    with pytest.raises(ValueError, match="classification"):
        RIDELoss(COUNTS, classification="bce")
    with pytest.raises(ValueError, match="diversity"):
        RIDELoss(COUNTS, diversity="max")
    with pytest.raises(ValueError, match="impl"):
        RIDELoss(COUNTS, impl="cuda")
    with pytest.raises(ValueError, match="reweight_epoch"):
        RIDELoss(COUNTS, reweight_epoch=-3)
    with pytest.raises(TypeError, match="epoch"):
        RIDELoss(COUNTS).set_epoch(1.5)


@pytest.mark.parametrize("classification", ["ldam", "focal"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_no_host_reads_in_forward_and_backward(classification, diversity):
    # Meta tensors have no data: any .item(), .cpu() or bool(tensor) in the loss would raise.
    # This also proves the buffers follow .to(device) and nothing is pinned to the CPU.
    from ride_fast.losses import RIDEDistillLoss

    loss_mod = RIDEDistillLoss(RIDELoss(COUNTS, classification=classification, diversity=diversity, impl="reference"))
    loss_mod.to("meta")
    for epoch in (1, 200):
        loss_mod.set_epoch(epoch)
        x = torch.empty(3, 8, len(COUNTS), device="meta", requires_grad=True)
        target = torch.empty(8, dtype=torch.long, device="meta")
        out = loss_mod(x, target, torch.empty(8, len(COUNTS), device="meta"))
        assert out.shape == () and out.device.type == "meta"
        out.backward()
        assert x.grad.shape == x.shape
