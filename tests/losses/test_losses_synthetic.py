"""The shared input builder of the loss tests and benchmarks derives its vectors through
ride_fast.losses.weights, as training does."""
import pytest
import torch

from ride_fast.losses import RIDELoss
from ride_fast.losses.synthetic import long_tailed_counts, ride_loss_inputs
from ride_fast.losses.weights import class_balanced_weights, diversity_temperatures, ldam_margins


def test_vectors_come_from_the_counts():
    inp = ride_loss_inputs(3, 5, 40, phase=1, seed=2, reweight_factor=0.3, base_temperature=1.5)
    assert inp.logits.shape == (3, 5, 40) and inp.logits.dtype == torch.float32
    assert inp.target.shape == (5,) and inp.target.dtype == torch.int64
    assert inp.counts.min() >= 1 and inp.counts.max() == 500
    torch.testing.assert_close(inp.margins, (30.0 * ldam_margins(inp.counts, 0.5)).float())
    torch.testing.assert_close(inp.class_weights, class_balanced_weights(inp.counts, 0.9999).float())
    t = 1.5 * diversity_temperatures(inp.counts, 0.3)
    torch.testing.assert_close(inp.temperature, t.float())
    assert inp.temperature_mean == pytest.approx(float(t.mean()), rel=1e-12)
    # the same vectors RIDELoss builds from those counts, after the switch
    loss = RIDELoss(inp.counts, reweight_factor=0.3, base_temperature=1.5, reweight_epoch=0)
    torch.testing.assert_close(loss.margins, inp.margins)
    torch.testing.assert_close(loss.class_weights, inp.class_weights)
    torch.testing.assert_close(loss.temperature, inp.temperature)
    assert loss.temperature_mean == pytest.approx(inp.temperature_mean, rel=1e-12)


def test_phases_and_options():
    first = ride_loss_inputs(2, 4, 10, phase=0, seed=1)
    assert first.class_weights is None and first.temperature is None and first.temperature_mean == 1.0
    assert ride_loss_inputs(2, 4, 10, phase=0, base_temperature=2.0).temperature.unique().tolist() == [2.0]
    assert ride_loss_inputs(2, 4, 10, margins=False).margins is None
    cosine = ride_loss_inputs(2, 4, 10, logits="cosine", dtype=torch.bfloat16)
    assert cosine.logits.dtype == torch.bfloat16 and cosine.logits.float().abs().max() <= 30.0
    again = ride_loss_inputs(2, 4, 10, phase=0, seed=1)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.target, again.target)
    with pytest.raises(ValueError, match="phase must be 0"):
        ride_loss_inputs(2, 4, 10, phase=2)
    with pytest.raises(ValueError, match="logits must be 'gaussian' or 'cosine'"):
        ride_loss_inputs(2, 4, 10, logits="uniform")
    counts = long_tailed_counts(1000, torch.Generator().manual_seed(0))
    assert counts.shape == (1000,) and counts.min() >= 1 and counts.max() == 500
