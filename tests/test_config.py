import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ride_fast.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_cifar_recipe():
    cfg = Config()
    assert cfg.loss.diversity_factor == -0.45 and cfg.loss.reweight_epoch == 160
    assert cfg.optim.milestones == (160, 180) and cfg.optim.gamma == 0.01 and cfg.optim.nesterov


def test_overrides_are_typed_with_yaml_rules():
    cfg = load_config(overrides=["optim.lr=1e-3", "model.num_experts=4", "optim.milestones=[60, 80]", "train.amp=bf16",
                                 "model.channels_last=true"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.num_experts == 4
    assert cfg.optim.milestones == (60, 80)
    assert cfg.train.amp == "bf16" and cfg.model.channels_last is True


def test_comma_separated_lists_read_like_yaml_lists():
    for written in ("10,20", "10, 20", "[10, 20]"):
        assert load_config(overrides=[f"optim.milestones={written}"]).optim.milestones == (10, 20)
    assert load_config(overrides=["data.mean=0.5,0.4,0.3"]).data.mean == (0.5, 0.4, 0.3)
    assert load_config(overrides=["analysis.methods=ce,ldam"]).analysis.methods == ("ce", "ldam")
    with pytest.raises(ConfigError, match=r"^override 'optim\.milestones=10,abc': optim\.milestones\[1\]: expected an integer, "
                                          r"got 'abc'$"):
        load_config(overrides=["optim.milestones=10,abc"])


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(overrides=["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"model\.num_experts: expected an integer"):
        load_config(overrides=["model.num_experts=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", r"unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
        ("optm.lr=0.1", r"unknown config key 'optm\.lr' \(did you mean 'optim\.lr'\?\)"),
        ("model.use_norm=yes please", r"model\.use_norm: expected true or false"),
        ("train.amp=fp8", r"train\.amp: 'fp8' is not one of"),
        ("train.amp=yes", r"train\.amp: 'yes' is not one of"),  # the word as written, not YAML's True
        ("loss.diversity=pairwse", r"did you mean 'pairwise'"),
        ("lr=0.1", r"unknown config key 'lr' \(did you mean 'optim\.lr' or 'router\.lr'\?\)"),
        ("model=3", r"'model' is not a key \(section\.key\)"),
        ("optim.lr", r"section\.key=value"),
        ("train.device=gpu", r"train\.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("optim.lr=-1", r"optim\.lr is a learning rate and must be > 0, got -1\.0"),
        ("router.lr=0", r"router\.lr is a learning rate and must be > 0"),
        ("model.name=resnet33", r"model\.name: unknown name 'resnet33' \(did you mean 'resnet32'\?\)"),
        ("model.num_experts=0", r"model\.num_experts must be in 1\.\.8, got 0"),
        ("loss.name=ridee", r"loss\.name: unknown name 'ridee' \(did you mean 'ride'\?\)"),
        ("data.batch_size=0", r"data\.batch_size must be >= 1"),
        ("router.top_k=0", r"router\.top_k must be >= 1"),
    ],
)
def test_bad_keys_and_values_name_the_override_and_the_dotted_path(override, message):
    with pytest.raises(ConfigError, match=r"^override '" + re.escape(override) + "': .*" + message):
        load_config(overrides=[override])


def test_override_errors_name_the_override_not_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lrr=0.1"])
    assert str(err.value).startswith("override 'optim.lrr=0.1': unknown config key 'optim.lrr'")
    assert "r.yaml" not in str(err.value)


def test_override_values_take_their_keys_type():
    cfg = load_config(overrides=["data.root=yes", "train.out_dir=1e-3", "model.channels_last=no", "train.deterministic=YES",
                                 "train.prefetch=off", "data.color_jitter=null", "train.device=cuda:1"])
    assert cfg.data.root == "yes" and cfg.train.out_dir == "1e-3"  # strings stay as written
    assert cfg.model.channels_last is False and cfg.train.deterministic is True and cfg.train.prefetch is False
    assert cfg.data.color_jitter is None and cfg.train.device == "cuda:1"


def test_names_match_the_registries():
    """The config checks model and loss names itself (show-config too); they are the registries' names."""
    from ride_fast.config import MODEL_NAMES
    from ride_fast.models import list_models

    assert sorted(MODEL_NAMES) == list_models()


def test_recipe_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  diversity_factr: -0.2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: unknown config key 'loss\.diversity_factr' \(did you mean 'loss\.diversity_factor'\?\)"):
        load_config(path)
    path.write_text("# a recipe\noptim:\n  momentum: 0.9\n  lr: -0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4: optim\.lr is a learning rate and must be > 0, got -0\.5"):
        load_config(path)
    path.write_text("train:\n  seed: 1\n  amp: yes\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: train\.amp: True is not one of .*quote the word"):
        load_config(path)
    path.write_text("optim:\n  lr: 0.1\n   momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: not valid YAML: "):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_dump_round_trips():
    cfg = load_config(overrides=["optim.milestones=[3]", "data.name=cifar100_lt"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert config_to_dict(again)["optim"]["milestones"] == [3]


def test_recipe_overrides_merge_with_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.2\n  weight_decay: 2.0e-4\n")
    cfg = load_config(path, ["optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.optim.weight_decay == 2e-4 and cfg.optim.momentum == 0.9


def test_parse_overrides_nests():
    assert parse_overrides(["optim.lr=1", "optim.momentum=0", "data.name=x"]) == {"optim": {"lr": 1.0, "momentum": 0.0},
                                                                                   "data": {"name": "x"}}


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe, tmp_path):
    """Every key the recipe sets reaches the config with its value (none dropped or left at its
    default), and the config survives a round trip through its dict and YAML forms."""
    cfg = load_config(recipe)
    resolved = config_to_dict(cfg)

    def leaves(d, prefix=()):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, (*prefix, k))
            else:
                yield (*prefix, k), v

    written = dict(leaves(yaml.safe_load(recipe.read_text()) or {}))
    assert written, f"{recipe.name} sets nothing"
    for path, value in written.items():
        got = resolved
        for k in path:
            got = got[k]
        assert (list(got) if isinstance(got, tuple) else got) == value, f"{recipe.name}: {'.'.join(path)} = {got!r}, the file says {value!r}"
    assert config_from_dict(resolved) == cfg
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_show_config_cli_prints_resolved_config():
    out = subprocess.run([sys.executable, "-m", "ride_fast", "show-config", "optim.lr=0.05"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)["optim"]["lr"] == 0.05
    bad = subprocess.run([sys.executable, "-m", "ride_fast", "show-config", "optim.lrr=0.05"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'optim.lr'" in bad.stderr
    for override in ("model.name=resnet33", "model.num_experts=0", "loss.name=ridee"):  # refused as train refuses them
        bad = subprocess.run([sys.executable, "-m", "ride_fast", "show-config", override], capture_output=True, text=True)
        assert bad.returncode == 2 and f"override '{override}'" in bad.stderr and not bad.stdout
