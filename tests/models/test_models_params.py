"""Parameter counts against the table of docs/method.md §2 (the test of a faithful architecture).

Models are built on the meta device, so counting costs no memory and no initialisation time.
"""
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

from ride_fast.models import create_model

# (name, C, cosine?) -> {E: printed count in millions}. E = 1 is the baseline: not reduced
# (CIFAR 16/32/64 with cosine, ImageNet with Linear, iNat with cosine); E > 1 reduced + cosine.
TABLE = {
    ("resnet32", 100): {1: "0.470", 2: "0.531", 3: "0.784", 4: "1.037", 6: "1.544"},
    ("resnet10", 1000): {1: "5.42", 2: "6.37", 3: "9.40", 4: "12.43", 6: "18.49"},
    ("resnet50", 1000): {1: "25.56", 2: "29.60", 3: "43.68", 4: "57.76", 6: "85.91"},
    ("resnext50_32x4d", 1000): {1: "25.03", 2: "29.06", 3: "42.89", 4: "56.72", 6: "84.37"},
    ("resnet50", 8142): {1: "40.18", 2: "51.54", 3: "76.59", 4: "101.64", 6: "151.73"},
}
CASES = [(name, c, e, printed) for (name, c), row in TABLE.items() for e, printed in row.items()]


def count_params(name: str, num_classes: int, num_experts: int) -> int:
    baseline = num_experts == 1
    use_norm = not baseline or name == "resnet32" or num_classes == 8142
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, num_experts=num_experts, reduce_dimension=not baseline, use_norm=use_norm)
    return sum(p.numel() for p in model.parameters())


def matches_printed(count: int, printed: str) -> bool:
    """count (in millions) rounds to `printed`, either directly or, as the published table evidently
    did for ResNet-50 / ResNeXt-50 E=4 (57,754,688 -> 57.755 -> 57.76), after a first rounding
    to thousands of parameters."""
    exact = Decimal(count) / Decimal(10**6)
    unit = Decimal(printed).as_tuple().exponent
    quantum = Decimal(1).scaleb(unit)
    direct = exact.quantize(quantum, ROUND_HALF_UP)
    twice = exact.quantize(Decimal("0.001"), ROUND_HALF_UP).quantize(quantum, ROUND_HALF_UP)
    return Decimal(printed) in (direct, twice)


def test_cifar_ride3_exact():
    assert count_params("resnet32", 100, 3) == 783_856


@pytest.mark.parametrize("name,num_classes,num_experts,printed", CASES, ids=[f"{n}-C{c}-E{e}" for n, c, e, _ in CASES])
def test_param_count_matches_the_published_table(name, num_classes, num_experts, printed):
    count = count_params(name, num_classes, num_experts)
    assert matches_printed(count, printed), f"{name} C={num_classes} E={num_experts}: {count:,} params, the table of docs/method.md §2 says {printed} M"


def test_matches_printed_is_strict():
    assert matches_printed(9_401_792, "9.40")
    assert not matches_printed(9_406_000, "9.40")
    assert not matches_printed(57_754_000, "57.76")  # 57.754 M: no rounding gives 57.76
