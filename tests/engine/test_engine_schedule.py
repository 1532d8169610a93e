"""The stage-1 lr multiplier: warm-up, then steps at the milestones (ride_fast.engine.schedule)."""
import pytest

from ride_fast.engine.schedule import lr_multiplier


def test_cifar_schedule():
    m = lambda e: lr_multiplier(e, 5, (160, 180), 0.01)  # noqa: E731
    assert [m(e) for e in (1, 2, 5, 6, 160)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert m(161) == pytest.approx(0.01) and m(180) == pytest.approx(0.01) and m(181) == pytest.approx(1e-4)
    assert lr_multiplier(1, 0, (), 0.1) == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(0, 5, (), 0.1)
