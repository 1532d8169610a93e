"""MACs per image with fvcore against the published table (docs/method.md §2).

BatchNorm is charged 4 operations per element, as in the table (see ride_fast.profiling.flops);
the totals then agree with the table to within 0.3%, and the test allows 1%.
"""
import pytest

from ride_fast.models import create_model
from ride_fast.profiling import model_cost

CASES = [
    # name, classes, experts, reduce, cosine, px, published GMACs for 1..E experts (None: not in the table)
    ("resnet32", 100, 1, False, False, 32, [0.0701]),
    ("resnet32", 100, 4, True, True, 32, [0.0506, 0.0764, 0.1022, 0.1280]),
    ("resnet50", 1000, 3, True, True, 224, [None, 4.502, 5.829]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-E{c[2]}")
def test_macs_match_the_published_table_within_one_percent(case):
    name, classes, experts, reduce, cosine, px, spec = case
    model = create_model(name, num_classes=classes, num_experts=experts, reduce_dimension=reduce, use_norm=cosine)
    cost = model_cost(model, px)
    for k, expected in enumerate(spec, 1):
        if expected is not None:
            assert cost.macs_with(k) / 1e9 == pytest.approx(expected, rel=0.01), f"{k} experts"
    # the parts add up to the whole network, counted in one trace
    assert cost.expert_macs == tuple([cost.expert_macs[0]] * experts)
    assert sum(cost.expert_params) + cost.trunk_params == sum(p.numel() for p in model.parameters())


def test_cost_leaves_the_model_mode_alone():
    model = create_model("resnet32", num_classes=10, num_experts=2)
    model.train()
    model_cost(model, 32)
    assert model.training


def test_flops_cli_prints_parts_and_totals(capsys):
    from ride_fast.cli import main

    assert main(["flops", "model.num_experts=3", "data.name=cifar100_lt"]) == 0
    out = capsys.readouterr().out
    assert "expert 3" in out and "total, 3 exp." in out and "0.1022" in out and "783,856" in out
    assert "resnet32, 100 classes, 3 experts, 32 px" in out and "2 routers," in out
    assert main(["flops", "model.num_experts=2", "data.name=cifar100_lt"]) == 0
    assert "1 router," in capsys.readouterr().out  # singular
