"""Router targets and loss on hand-made logits, and one router step (docs/method.md §5).

Label of router i: the prefix ensemble of experts 1..i is wrong AND some longer prefix 1..j, j > i,
is right. With two classes and target 0, the prefix 1..i is right exactly when the sum of the
experts' class-0 logits is positive, so every pattern of prefix correctness can be written down.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ride_fast.router import Router, prefix_correct, prefix_mean_logits, router_labels, router_loss, router_step


def logits_for(patterns: list[tuple[bool, ...]]) -> torch.Tensor:
    """expert_logits [E, B, 2] whose prefix sums are +1 (right, target 0) or -1 (wrong)."""
    sums = torch.tensor([[1.0 if p else -1.0 for p in pat] for pat in patterns]).T  # [E, B]
    a = torch.diff(sums, dim=0, prepend=torch.zeros(1, sums.shape[1]))  # expert k adds a[k]
    return torch.stack([a, torch.zeros_like(a)], dim=-1)


def expected_labels(pattern: tuple[bool, ...]) -> list[bool]:
    return [not pattern[i] and any(pattern[i + 1 :]) for i in range(len(pattern) - 1)]


@pytest.mark.parametrize("E", [2, 3, 4])
def test_every_pattern_of_prefix_correctness(E):
    patterns = list(itertools.product([False, True], repeat=E))
    z = logits_for(patterns)
    targets = torch.zeros(len(patterns), dtype=torch.long)
    assert prefix_correct(z, targets).T.tolist() == [list(p) for p in patterns]
    labels = router_labels(z, targets)
    assert labels.dtype == torch.bool and labels.shape == (E - 1, len(patterns))
    assert labels.T.tolist() == [expected_labels(p) for p in patterns]


def test_named_cases_with_three_experts():
    cases = {  # (prefix 1 right, prefix 1-2 right, prefix 1-3 right) -> (router 1, router 2)
        (False, True, False): [True, False],  # expert 2 fixes it: call it, then stop
        (False, False, True): [True, True],  # only all three are right: keep calling
        (False, False, False): [False, False],  # nobody is right: calling more is useless
        (True, False, True): [False, True],  # right at once: stop (router 2 is never asked at test time)
        (True, True, True): [False, False],
        (False, True, True): [True, False],
    }
    z = logits_for(list(cases))
    labels = router_labels(z, torch.zeros(len(cases), dtype=torch.long))
    assert labels.T.tolist() == list(cases.values())


@pytest.mark.parametrize("E", [2, 3, 5, 8])
def test_against_a_loop_transcription_on_random_logits(E):
    torch.manual_seed(E)
    B, C = 64, 5
    z = torch.randn(E, B, C) * 3
    y = torch.randint(0, C, (B,))
    labels = router_labels(z, y)
    for b in range(B):
        right = [int(z[: i + 1, b].sum(0).argmax()) == int(y[b]) for i in range(E)]
        assert labels[:, b].tolist() == expected_labels(tuple(right))


def test_prefix_means_are_running_means():
    z = torch.randn(4, 3, 7)
    means = prefix_mean_logits(z)
    for i in range(4):
        torch.testing.assert_close(means[i], z[: i + 1].mean(0))


def test_bf16_logits_are_judged_in_float32():
    z = torch.randn(3, 8, 5).bfloat16()
    y = torch.randint(0, 5, (8,))
    assert torch.equal(router_labels(z, y), router_labels(z.float(), y))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"E >= 2"):
        router_labels(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets \(5,\)"):
        router_labels(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        router_loss(torch.zeros(2, 4), torch.zeros(2, 5, dtype=torch.bool), 100.0)


def test_loss_is_weighted_bce_mean_over_batch_averaged_over_routers():
    torch.manual_seed(0)
    r = torch.randn(3, 10)
    labels = torch.rand(3, 10) < 0.3
    w = 100.0
    per_router = [
        (-(w * labels[i].float() * F.logsigmoid(r[i]) + (1 - labels[i].float()) * F.logsigmoid(-r[i]))).mean() for i in range(3)
    ]
    torch.testing.assert_close(router_loss(r, labels, w), torch.stack(per_router).mean())


def test_router_step_gradients_reach_only_the_router_and_the_loss_goes_down():
    torch.manual_seed(0)
    E, B, C = 3, 64, 6
    router = Router(E, 16, C, top_k=4)
    z = torch.randn(E, B, C) * 5
    feats = torch.randn(E, B, 16).abs()
    y = torch.randint(0, C, (B,))
    opt = torch.optim.SGD(router.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(40):
        step = router_step(router, z, feats, y, w_on=100.0)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        losses.append(float(step.loss.detach()))
    assert step.labels.shape == (E - 1, B) and step.router_logits.shape == (E - 1, B)
    assert losses[-1] < 0.7 * losses[0]
