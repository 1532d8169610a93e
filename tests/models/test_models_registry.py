"""The model registry: families register into it, it imports no model, and a registered builder
is built by create_model (and, through list_models(), by every test of tests/models)."""
import ast
from pathlib import Path
from unittest import mock

import pytest
import torch

import ride_fast.models as models
from ride_fast.models import create_model, is_model, list_models, model_entrypoint, register_model
from ride_fast.models.registry import MODELS
from ride_fast.models.resnet_cifar import resnet32

MODELS_DIR = Path(models.__file__).parent


def test_every_family_is_registered_by_importing_the_package():
    assert list_models() == ["resnet10", "resnet32", "resnet50", "resnext50_32x4d"]
    assert models.MODELS is MODELS and model_entrypoint("resnet32") is resnet32
    assert is_model("resnet50") and not is_model("resnet51")


@pytest.mark.parametrize("leaf", ["registry.py", "layout.py", "output.py", "heads.py"])
def test_leaves_import_nothing_of_models(leaf):
    tree = ast.parse((MODELS_DIR / leaf).read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert not name.startswith("ride_fast"), f"ride_fast/models/{leaf} imports {name}"
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"ride_fast/models/{leaf} has a relative import"


def test_a_registered_builder_is_built_by_create_model_and_listed():
    def tiny(num_classes, num_experts, reduce_dimension=True, use_norm=True):
        model = resnet32(num_classes, num_experts, reduce_dimension, use_norm)
        model._model_args["name"] = "tiny"
        return model

    with mock.patch.dict(MODELS):
        assert register_model("tiny")(tiny) is tiny
        assert "tiny" in list_models()
        torch.manual_seed(0)
        model = create_model("tiny", num_classes=5, num_experts=2, batched=True)
        assert model.batched and model.model_args["name"] == "tiny" and model.num_classes == 5
        with pytest.raises(ValueError, match="'tiny' is already registered"):
            register_model("tiny")(tiny)
        # the per-expert twin of a batched model is rebuilt from the registry too
        per = models.to_per_expert(model)
        assert not per.batched and per.model_args["name"] == "tiny"
    assert "tiny" not in list_models()


def test_register_model_bare_uses_the_function_name():
    with mock.patch.dict(MODELS):

        @register_model
        def my_net(num_classes, num_experts, reduce_dimension=True, use_norm=True):
            raise AssertionError("not built here")

        assert model_entrypoint("my_net") is my_net


def test_unknown_name_from_the_registry():
    with pytest.raises(ValueError, match=r"unknown model 'resnet_32'\. Did you mean 'resnet32'\?"):
        model_entrypoint("resnet_32")
