"""Every recipe in configs/: it loads, holds only what differs from the defaults, opens with a header
that says what it reproduces and how to launch it, carries the published numbers (docs/method.md §4, §5,
§8, §9), and runs: two training steps on tiny synthetic data with the recipe's class count and its
real architecture (distillation recipes from a teacher checkpoint written here by the teacher
recipe), or one router step through the stage-2 entry point (router recipes).

Synthetic data: 32 px images, one per class plus a few more for class 0 (every class needs one),
batch 4. The two steps are the recipe's own model, loss and optimizer; only the data, the batch,
the image size, the epoch count and the device are overridden. Teachers (for distillation) and
stage-1 networks (for routers) of the ResNet-50 / ResNeXt-50 recipes are built with the CIFAR
ResNet-32 trunk (same class count and expert count): a checkpoint of a 6-expert ResNet-50 at 8,142
classes would be over a gigabyte. The `slow` cases build ResNet-50 / ResNeXt-50 networks with 1000
or 8142 classes (up to 152 M parameters, a few seconds each on a CPU core).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from ride_fast.config import Config, load_config
from ride_fast.data import ArrayDataset
from ride_fast.engine import Trainer
from ride_fast.engine.checkpoint import load_routed_checkpoint
from ride_fast.engine.stage2 import train_router
from ride_fast.losses.distill import RIDEDistillLoss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
ROUTER_RECIPES = [p for p in RECIPES if p.stem.endswith("_router")]
STAGE1_RECIPES = [p for p in RECIPES if p not in ROUTER_RECIPES]

CLASSES = {"mnist_lt": 10, "cifar10_lt": 10, "cifar100_lt": 100, "imagenet_lt": 1000, "inat2018": 8142}
BIG_MODELS = ("resnet50", "resnext50_32x4d")  # built for real, but slow: marked `slow`
SMALL_BACKBONE = "resnet32"  # stands in for the big ones in teacher / stage-1 checkpoints

# The configurations of the published recipes (docs/method.md §8, §9): file -> (model.name, experts, kind).
PAPER = {
    "cifar100_lt_ce.yaml": ("resnet32", 1, "ce"),
    "cifar100_lt_ldam_drw.yaml": ("resnet32", 1, "ldam_drw"),
    "cifar100_lt_ride2.yaml": ("resnet32", 2, "ride"),
    "cifar100_lt_ride3.yaml": ("resnet32", 3, "ride"),
    "cifar100_lt_ride4.yaml": ("resnet32", 4, "ride"),
    "cifar100_lt_ride6_teacher.yaml": ("resnet32", 6, "ride"),
    "cifar100_lt_ride4_distill.yaml": ("resnet32", 4, "distill"),
    "cifar100_lt_ride3_router.yaml": ("resnet32", 3, "router"),
    "imagenet_lt_resnext50_ce.yaml": ("resnext50_32x4d", 1, "ce"),
    "inat2018_resnet50_ce.yaml": ("resnet50", 1, "ce"),
    **{
        f"{prefix}_ride{suffix}.yaml": (model, experts, kind)
        for prefix, model in [
            ("imagenet_lt_resnet10", "resnet10"),
            ("imagenet_lt_resnet50", "resnet50"),
            ("imagenet_lt_resnext50", "resnext50_32x4d"),
            ("inat2018_resnet50", "resnet50"),
        ]
        for suffix, experts, kind in [("3", 3, "ride"), ("6_teacher", 6, "ride"), ("4_distill", 4, "distill"),
                                      ("3_router", 3, "router")]
    },
}

# §8, per data set; `warmup` is 20 for CIFAR distillation (checked separately).
SPEC = {
    "cifar100_lt": {"epochs": 200, "batch": 128, "lr": 0.1, "wd": 5e-4, "milestones": (160, 180), "gamma": 0.01,
                    "reweight_epoch": 160, "diversity": -0.45, "reweight_factor": 0.05, "image_size": 32,
                    "select": "overall", "checkpoint": "best.pt"},
    "imagenet_lt": {"epochs": 100, "batch": 256, "lr": 0.1, "wd": 2e-4, "milestones": (60, 80), "gamma": 0.1,
                    "reweight_epoch": 80, "diversity": -0.2, "reweight_factor": 0.02, "image_size": 224,
                    "select": "last", "checkpoint": "last.pt"},
    "inat2018": {"epochs": 100, "batch": 512, "lr": 0.2, "wd": 2e-4, "milestones": (60, 80), "gamma": 0.1,
                 "reweight_epoch": 80, "diversity": -0.2, "reweight_factor": 0.015, "image_size": 224,
                 "select": "last", "checkpoint": "last.pt"},
}
TOP_K = {"resnet32": 30, "resnet10": 30, "resnet50": 50, "resnext50_32x4d": 50}  # §5 / §8

# The original code's configs/config_imbalance_cifar100_ldam_drw.json, every field (frank-xwang/RIDE-LongTailRecognition);
# cifar100_lt_ldam_drw.yaml must be this run. Fields of the original's own bookkeeping are listed with None.
ORIGINAL_LDAM_DRW = {
    "name": None,  # "Imbalance_CIFAR100_LT_RIDE": a run name
    "n_gpu": 1,
    "arch": {"type": "ResNet32Model", "args": {"num_classes": 100, "reduce_dimension": False, "use_norm": True, "num_experts": 1}},
    "data_loader": {"type": "ImbalanceCIFAR100DataLoader",
                    "args": {"data_dir": None, "batch_size": 128, "shuffle": True, "num_workers": None}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.1, "weight_decay": 2e-4, "momentum": 0.9}},  # no "nesterov": SGD's False
    "loss": {"type": "LDAMLoss", "args": {"reweight_epoch": 160}},  # LDAMLoss defaults: max_m 0.5, s 30
    "metrics": ["accuracy"],
    "lr_scheduler": {"type": "CustomLR", "args": {"step1": 160, "step2": 180, "gamma": 0.01, "warmup_epoch": 5}},
    "trainer": {"epochs": 200, "save_dir": None, "save_period": None, "verbosity": None, "monitor": "max val_accuracy",
                "tensorboard": None},
}

# §9: the reference number each recipe's header must quote (overall / many / medium / few).
REFERENCE = {
    "cifar100_lt_ce.yaml": "39.1 / 66.1 / 37.3 / 10.6",
    "cifar100_lt_ride3.yaml": "48.6 / 67.0 / 49.9 / 25.7",
    "cifar100_lt_ride3_router.yaml": "48.6 / 67.0 / 49.9 / 25.7",
    "cifar100_lt_ride4_distill.yaml": "49.4 / 67.7 / 51.3 / 25.7",
    "imagenet_lt_resnext50_ce.yaml": "44.4 / 65.9 / 37.5 / 7.7",
    "imagenet_lt_resnext50_ride3.yaml": "55.7 / 67.0 / 52.2 / 36.0",
    "imagenet_lt_resnext50_ride3_router.yaml": "55.7 / 67.0 / 52.2 / 36.0",
    "imagenet_lt_resnext50_ride4_distill.yaml": "56.8 / 68.3 / 53.5 / 35.9",
    "inat2018_resnet50_ce.yaml": "61.7 / 72.2 / 63.0 / 57.2",
    "inat2018_resnet50_ride3.yaml": "71.2 / 70.2 / 71.2 / 71.6",
    "inat2018_resnet50_ride3_router.yaml": "71.2 / 70.2 / 71.2 / 71.6",
    "inat2018_resnet50_ride4_distill.yaml": "72.6 / 70.9 / 72.5 / 73.1",
}

# Keys a recipe may write out although they equal the default: they name what the recipe is.
IDENTITY_KEYS = {"data.name", "model.num_experts", "loss.name", "loss.classification", "analysis.methods"}

SMOKE = [
    "data.batch_size=4", "data.eval_batch_size=64", "data.image_size=32", "train.epochs=1",
    "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu", "train.compile=false",
    "train.cuda_graphs=false", "train.keep_last=1",
]


def _ids(path: Path) -> str:
    return path.name


def _cfg(path: Path) -> Config:
    return load_config(path)


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def _launch_checkpoint(path: Path) -> str:
    """The --checkpoint of a router recipe's launch line."""
    launch = next(line for line in _header(path).splitlines() if line.startswith("Launch"))
    return re.search(r"--checkpoint (\S+)", launch).group(1)


def _marks(path: Path) -> list:
    cfg = _cfg(path)
    return [pytest.mark.slow] if cfg.model.name in BIG_MODELS or cfg.data.name == "inat2018" else []


def _with_marks(paths: list[Path]) -> list:
    return [pytest.param(p, id=p.name, marks=_marks(p)) for p in paths]


def synthetic(num_classes: int, extra: int = 6, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test): every class once plus `extra` images of class 0; 16 test images; 32 px."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(num_classes), torch.zeros(extra, dtype=torch.long)])
    test_labels = torch.arange(16) % num_classes

    def make(y: torch.Tensor) -> ArrayDataset:
        images = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g)
        return ArrayDataset(images, y, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), name=f"synthetic{num_classes}")

    return make(labels), make(test_labels)


def _quiet(_msg: str) -> None:
    pass


def _run_stage1(recipe: Path, out_dir: Path, data, extra=()) -> Path:
    """Train `recipe` for one two-step epoch (fit: evaluation and checkpoints included); return out_dir."""
    cfg = load_config(recipe, SMOKE + [f"train.out_dir={out_dir}", *extra])
    Trainer(cfg, train_set=data[0], test_set=data[1], log=_quiet).fit()
    return out_dir


# ----------------------------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids)
def test_recipe_loads_and_holds_only_what_differs(recipe):
    cfg = _cfg(recipe)
    default = Config()
    raw = yaml.safe_load(recipe.read_text())
    assert raw, f"{recipe.name} is empty"
    for section, keys in raw.items():
        for key in keys:
            dotted = f"{section}.{key}"
            value, base = getattr(getattr(cfg, section), key), getattr(getattr(default, section), key)
            assert value != base or dotted in IDENTITY_KEYS, f"{recipe.name}: {dotted}={value!r} is the default; leave it out"


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids)
def test_recipe_header_says_what_where_how_long_and_how(recipe):
    header = _header(recipe)
    name = recipe.name
    assert header and len(header.splitlines()) >= 3, f"{name}: no header comment"
    for label in ("Hardware:", "Expected time"):
        assert label in header, f"{name}: the header has no '{label}'"
    launch = [line for line in header.splitlines() if line.startswith("Launch")]
    assert launch and all(f"configs/{name}" in line for line in launch), f"{name}: every launch line must name configs/{name}"
    kind = PAPER.get(name, (None, None, None))[2]
    if kind == "router":
        assert f"ride-fast route --config configs/{name} --checkpoint " in header
    elif kind is not None:
        assert f"ride-fast train --config configs/{name}" in header
        assert f"torchrun --nproc_per_node=8 -m ride_fast train --config configs/{name}" in header
        assert "GLOBAL batch" in header
        if load_config(recipe).data.image_size == 224:  # a batch of 224 px images may not fit: say how to keep it
            assert "train.accumulate_steps=K" in header, f"{name}: the header must say how to keep the global batch"
    if name in REFERENCE:
        assert REFERENCE[name] in " ".join(header.split()), f"{name}: the header must quote the published {REFERENCE[name]}"


def test_every_configuration_of_the_spec_has_a_recipe():
    names = {p.name for p in RECIPES}
    assert not set(PAPER) - names, f"missing recipes: {sorted(set(PAPER) - names)}"
    unlisted = [p.name for p in RECIPES if _cfg(p).data.name in SPEC and p.name not in PAPER]
    assert not unlisted, f"paper-data recipes not in PAPER (add them with their architecture and kind): {unlisted}"


def test_stage1_runs_do_not_share_a_folder():
    seen: dict[str, str] = {}
    for p in STAGE1_RECIPES:
        out = _cfg(p).train.out_dir
        assert out not in seen, f"{p.name} and {seen[out]} both write to {out}"
        seen[out] = p.name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_carries_the_spec_numbers(name):
    model, experts, kind = PAPER[name]
    cfg = _cfg(CONFIGS / name)
    spec = SPEC[cfg.data.name]
    if kind == "router":
        stage1 = _cfg(CONFIGS / name.replace("_router", ""))
        r = cfg.router
        assert (r.top_k, r.hidden, r.share_fc, r.w_on, r.threshold) == (TOP_K[model], 16, True, 100.0, 0.5)
        assert (r.epochs, r.lr, r.momentum, r.weight_decay, r.batch_size) == (5, 0.01, 0.9, 5e-4, 512)
        assert cfg.router == stage1.router, "the stage-1 recipe must give `ride-fast route` the same router"
        # `ride-fast flops` on the router recipe counts the network it routes
        assert (cfg.model.name, cfg.model.num_experts) == (stage1.model.name, stage1.model.num_experts) == (model, experts)
        assert (cfg.data.name, cfg.data.image_size) == (stage1.data.name, stage1.data.image_size)
        assert cfg.train.out_dir == stage1.train.out_dir  # routed.pt beside the stage-1 checkpoints
        assert _launch_checkpoint(CONFIGS / name) == f"{stage1.train.out_dir}/{spec['checkpoint']}"
        return
    o, m, t = cfg.optim, cfg.model, cfg.train
    assert (m.name, m.num_experts) == (model, experts)
    if kind == "ldam_drw":  # the original's own baseline config, checked field by field below
        return
    assert (t.epochs, cfg.data.batch_size, cfg.data.image_size, t.select_best_on) == (
        spec["epochs"], spec["batch"], spec["image_size"], spec["select"])
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay) == (spec["lr"], 0.9, True, spec["wd"])
    warmup = 20 if kind == "distill" and cfg.data.name == "cifar100_lt" else 5
    assert (o.warmup_epochs, o.milestones, o.gamma) == (warmup, spec["milestones"], spec["gamma"])
    if kind == "ce":
        assert (cfg.loss.name, m.reduce_dimension, m.use_norm) == ("ce", False, False)
        assert not cfg.distill.teacher_checkpoint
        return
    loss = cfg.loss
    assert (m.reduce_dimension, m.use_norm) == (True, True)
    assert (loss.name, loss.classification, loss.individual, loss.diversity, loss.reweight) == ("ride", "ldam", True, "mean", True)
    assert (loss.max_m, loss.s, loss.base_temperature, loss.beta) == (0.5, 30.0, 1.0, 0.9999)
    assert (loss.diversity_factor, loss.reweight_epoch, loss.reweight_factor) == (
        spec["diversity"], spec["reweight_epoch"], spec["reweight_factor"])
    assert cfg.router.top_k == TOP_K[model]
    if kind != "distill":
        assert not cfg.distill.teacher_checkpoint
        return
    d = cfg.distill
    assert (d.temperature, d.scale_by_experts, d.teacher_bn_train) == (1.5, True, True)  # §4, the original's behaviour
    teacher = _cfg(CONFIGS / name.replace("_ride4_distill", "_ride6_teacher"))
    assert (teacher.model.name, teacher.model.num_experts, teacher.data.name) == (model, 6, cfg.data.name)
    assert d.teacher_checkpoint == f"{teacher.train.out_dir}/{spec['checkpoint']}"


def test_ldam_drw_recipe_is_the_originals_config_field_for_field():
    cfg = _cfg(CONFIGS / "cifar100_lt_ldam_drw.yaml")
    o, arch = ORIGINAL_LDAM_DRW, ORIGINAL_LDAM_DRW["arch"]["args"]
    assert ORIGINAL_LDAM_DRW["n_gpu"] == 1 and cfg.train.sync_bn is False  # one process: BatchNorm over the batch of 128
    assert (ORIGINAL_LDAM_DRW["arch"]["type"], cfg.model.name) == ("ResNet32Model", "resnet32")
    assert (cfg.model.num_experts, cfg.model.reduce_dimension, cfg.model.use_norm) == (
        arch["num_experts"], arch["reduce_dimension"], arch["use_norm"])
    assert CLASSES[cfg.data.name] == arch["num_classes"]
    loader = o["data_loader"]
    assert (loader["type"], cfg.data.name, cfg.data.imbalance_factor) == ("ImbalanceCIFAR100DataLoader", "cifar100_lt", 100.0)
    assert cfg.data.batch_size == loader["args"]["batch_size"] and loader["args"]["shuffle"] is True
    opt = o["optimizer"]["args"]
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.nesterov) == (
        opt["lr"], opt["weight_decay"], opt["momentum"], False)
    loss = o["loss"]
    assert (loss["type"], cfg.loss.name) == ("LDAMLoss", "ldam")
    assert (cfg.loss.reweight, cfg.loss.reweight_epoch) == (True, loss["args"]["reweight_epoch"])
    assert (cfg.loss.max_m, cfg.loss.s, cfg.loss.beta) == (0.5, 30.0, 0.9999)  # LDAMLoss's defaults, its DRW beta
    lr = o["lr_scheduler"]["args"]
    assert (cfg.optim.milestones, cfg.optim.gamma, cfg.optim.warmup_epochs) == ((lr["step1"], lr["step2"]), lr["gamma"], lr["warmup_epoch"])
    trainer = o["trainer"]
    assert (cfg.train.epochs, trainer["monitor"], cfg.train.select_best_on) == (trainer["epochs"], "max val_accuracy", "overall")


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids)
def test_recipe_time_estimates_say_whether_measured_and_on_what_basis(recipe):
    header = " ".join(_header(recipe).split())
    expected = header[header.index("Expected time"):]
    expected = expected[:expected.index("Data:")] if "Data:" in expected else expected
    assert "estimate" in expected or "measured" in expected, f"{recipe.name}: say whether the time is measured or an estimate"
    assert "takes days" not in header  # 2 CPU cores train a CIFAR recipe in hours (BENCHMARKS.md)
    data = _cfg(recipe).data.name
    if data == "cifar100_lt" and recipe not in ROUTER_RECIPES:
        assert "On 2 CPU cores:" in expected and 'BENCHMARKS.md, "Training step"' in expected, recipe.name
    if data in ("imagenet_lt", "inat2018"):  # the loader, not the GPU, sets the pace of these runs
        assert '818 images/s' in expected and 'BENCHMARKS.md, "Data loaders"' in expected, recipe.name


# ----------------------------------------------------------------------------------------------- they run


def _teacher_checkpoint(recipe: Path, cfg: Config, data, tmp_path: Path) -> Path:
    """Run the teacher recipe the distillation recipe names (its out_dir) for two steps; return the
    checkpoint file the recipe names, as that run wrote it."""
    rel = Path(cfg.distill.teacher_checkpoint)
    matches = [p for p in STAGE1_RECIPES if _cfg(p).train.out_dir == str(rel.parent)]
    assert len(matches) == 1, f"{recipe.name}: no single recipe writes {rel.parent}"
    teacher = matches[0]
    extra = [f"model.name={SMALL_BACKBONE}"] if _cfg(teacher).model.name != SMALL_BACKBONE else []
    out = _run_stage1(teacher, tmp_path / "teacher", data, extra)
    path = out / rel.name
    assert path.is_file(), f"the teacher run did not write {rel.name}"
    return path


@pytest.mark.parametrize("recipe", _with_marks(STAGE1_RECIPES))
def test_two_training_steps(recipe, tmp_path):
    cfg = _cfg(recipe)
    C = CLASSES[cfg.data.name]
    data = synthetic(C)
    extra = []
    if cfg.distill.teacher_checkpoint:
        extra.append(f"distill.teacher_checkpoint={_teacher_checkpoint(recipe, cfg, data, tmp_path)}")
    run = load_config(recipe, SMOKE + [f"train.out_dir={tmp_path / 'run'}", *extra])
    trainer = Trainer(run, train_set=data[0], test_set=data[1], log=_quiet)
    model = trainer.model
    assert (model.name, model.num_experts, model.num_classes) == (cfg.model.name, cfg.model.num_experts, C)
    if cfg.distill.teacher_checkpoint:
        assert isinstance(trainer.criterion, RIDEDistillLoss)
        assert trainer.teacher.num_experts == 6 and trainer.teacher.num_classes == C
    params = [p for p in model.parameters() if p.requires_grad]
    watched = {0: params[0].detach().clone(), len(params) - 1: params[-1].detach().clone()}  # stem, last classifier
    result = trainer.train_epoch(1)
    assert trainer.step.seen == 2 * 4, "two steps of batch 4"
    assert math.isfinite(result.loss)
    for i, before in watched.items():
        assert not torch.equal(before, params[i].detach()), f"parameter {i} did not move in two SGD steps"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # fvcore, in the routed report
@pytest.mark.parametrize("recipe", _with_marks(ROUTER_RECIPES))
def test_one_router_step(recipe, tmp_path):
    cfg = _cfg(recipe)
    C = CLASSES[cfg.data.name]
    data = synthetic(C)
    stage1 = CONFIGS / recipe.name.replace("_router", "")
    s1 = _cfg(stage1)
    extra = [f"model.name={SMALL_BACKBONE}"] if s1.model.name in BIG_MODELS else []
    out = _run_stage1(stage1, tmp_path / "stage1", data, extra)
    ckpt = out / Path(_launch_checkpoint(recipe)).name
    assert ckpt.is_file(), f"the stage-1 run of {stage1.name} did not write {ckpt.name}"
    run = load_config(recipe, SMOKE + [f"train.out_dir={out}", "router.epochs=1", "router.batch_size=4"])
    cheap = s1.model.name == "resnet32" and cfg.data.image_size == 32  # the routed report counts MACs with fvcore
    result = train_router(run, ckpt, log=_quiet, evaluate=cheap, datasets=data)
    assert len(result["history"]) == 1 and math.isfinite(result["history"][0]["loss"])
    net, router, _ = load_routed_checkpoint(out / "routed.pt")
    assert Path(result["checkpoint"]) == out / "routed.pt"
    assert (net.num_classes, net.num_experts) == (C, s1.model.num_experts)
    assert router.router_args["top_k"] == cfg.router.top_k and router.num_routers == net.num_experts - 1
    if cheap:
        report = result["report"]
        assert report.num_images == len(data[1]) and 1.0 <= report.mean_experts["overall"] <= net.num_experts
