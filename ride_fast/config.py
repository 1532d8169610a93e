"""Typed configuration: frozen dataclasses per section, YAML recipes, `section.key=value` overrides.

A recipe holds only what differs from the defaults below. Every key is checked: an unknown key or a
value of the wrong type raises `ConfigError` naming the dotted path and the closest valid key.
`dump_config` writes the fully resolved config (every run stores one next to its checkpoints).

This module is a leaf: it imports nothing from the rest of ride_fast.
"""
from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Tuple

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet32"  # backbone: resnet32 (CIFAR) | resnet10 | resnet50 | resnext50_32x4d; see ride_fast.models.list_models()
    num_experts: int = 3  # E, expert branches on the shared trunk (1..8); 1 with reduce_dimension=false is the plain baseline
    reduce_dimension: bool = True  # narrow the per-expert stages (every RIDE recipe)
    use_norm: bool = True  # cosine classifier with s = 30; False: Linear with bias
    num_classes: int = 0  # 0: taken from the data set; otherwise it must equal the data set's class count
    channels_last: bool = True  # faster on CPUs (oneDNN) and GPUs (cuDNN NHWC); same results
    batched: bool = True  # all experts as one grouped network (models/batched.py); same results, either checkpoint layout loads


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist_lt"  # mnist_lt | cifar100_lt | cifar10_lt | imagenet_lt | inat2018 | image_list | image_folder
    root: str = ""  # folder holding the data set files / images (unused by mnist_lt)
    train_list: str = ""  # file data sets: list file, JSON annotations or class folder of the training images ("": standard name)
    test_list: str = ""  # file data sets: the same for the evaluation images
    num_classes: int = 0  # file data sets: 0 = from the data set (JSON categories, class folders, 1000, 8142, max label + 1)
    imbalance_factor: float = 100.0  # mnist_lt, cifar*_lt: n_max / n_min of the long-tailed training set (>= 1; 1 = balanced)
    test_per_class: int = 100  # mnist_lt: balanced held-out images per class
    image_size: int = 32  # crop size in training and evaluation (224 for ImageNet-LT and iNaturalist)
    resize_size: int = 0  # photos, evaluation: shorter side before the center crop; 0 = image_size * 8 / 7 (256 for 224)
    color_jitter: float | None = None  # photos: brightness/contrast/saturation strength; None = the recipe's (0.4 ImageNet-LT, else 0)
    mean: Tuple[float, ...] = ()  # photos: per-channel normalisation; empty = the data set's
    std: Tuple[float, ...] = ()  # photos: per-channel standard deviation of the normalisation; empty = the data set's
    augment: bool = True  # training augmentation (docs/method.md §7); false: training images as evaluated
    batch_size: int = 128  # global training batch, split over the torchrun ranks (must divide by their number)
    eval_batch_size: int = 512  # global evaluation batch (split over the ranks); no effect on results
    loader: Literal["auto", "memory", "dali", "torch"] = "auto"  # auto: memory for arrays, DALI for files if installed, else torch
    decode_device: Literal["auto", "cpu", "gpu"] = "auto"  # DALI: auto decodes on the GPU when training on one
    num_workers: int = -1  # file loaders: DataLoader workers / DALI threads; -1 = one per CPU core, 0 = in the main process
    verify_images: Literal["none", "header", "decode"] = "header"  # file data sets: image checks before training
    skip_bad_images: bool = False  # leave out missing / unreadable images (and say how many) instead of stopping
    seed: int = 0  # selection of the long-tailed subset (the original uses numpy seed 0)


@dataclass(frozen=True)
class LossConfig:
    name: str = "ride"  # ride (the RIDE loss, docs/method.md §3) | ce | cb_ce (class-balanced CE) | ldam (LDAM-DRW) | focal
    max_m: float = 0.5  # LDAM: largest margin
    s: float = 30.0  # cosine scale already applied in the model; margins are s * m_c
    diversity_factor: float = -0.45  # lambda; negative maximises the KL (-0.45 CIFAR, -0.2 ImageNet-LT / iNat); 0: no diversity term
    diversity: Literal["mean", "pairwise"] = "mean"  # mean: KL to the detached mean (original code); pairwise: the paper's formula
    individual: bool = True  # False: "collaborative", the classification loss on the mean logits
    classification: Literal["ldam", "ce", "focal"] = "ldam"  # per-expert term of the RIDE loss
    reweight: bool = True  # DRW: class-balanced weights and temperatures after reweight_epoch
    reweight_epoch: int = 160  # epochs 1..reweight_epoch unweighted, T = T_base; from reweight_epoch + 1 on DRW and T_c; -1: never
    reweight_factor: float = 0.05  # gamma of the distribution-aware temperatures (0.05 CIFAR, 0.02 ImageNet-LT, 0.015 iNat; 0..1)
    base_temperature: float = 1.0  # T_base of the diversity term (> 0)
    beta: float = 0.9999  # class-balanced (effective number) weights w_c = (1 - beta) / (1 - beta^n_c), in [0, 1)
    focal_gamma: float = 1.0  # focal loss exponent (>= 0; 0 is cross-entropy); name=focal or classification=focal
    impl: Literal["auto", "reference", "triton"] = "auto"  # auto: fused Triton kernel on CUDA, closed-form gradient on the CPU


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # for the global batch of data.batch_size (SGD)
    momentum: float = 0.9  # SGD momentum; 0: none
    nesterov: bool = True  # Nesterov momentum (every RIDE recipe)
    weight_decay: float = 5e-4  # L2 penalty on every parameter (5e-4 CIFAR, 2e-4 ImageNet-LT / iNat)
    warmup_epochs: int = 5  # lr x epoch / warmup_epochs for epochs 1..warmup_epochs; 0: no warm-up
    milestones: Tuple[int, ...] = (160, 180)  # epochs after which lr is multiplied by gamma
    gamma: float = 0.01  # lr factor applied once per milestone passed (0.01 CIFAR, 0.1 ImageNet-LT / iNat)
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"  # auto: fused where torch has it (CUDA, CPU)


@dataclass(frozen=True)
class DistillConfig:
    teacher_checkpoint: str = ""  # stage-1 checkpoint of the teacher (6 experts in the recipes); empty: no distillation
    temperature: float = 1.5  # T_d of the distillation KL (> 0)
    scale_by_experts: bool = True  # the original multiplies the loss by E (docs/method.md §4)
    teacher_bn_train: bool = True  # the original leaves the teacher's BatchNorm in training mode; false: eval mode


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200  # stage-1 epochs (200 CIFAR, 100 ImageNet-LT / iNat)
    seed: int = 0  # seeds torch, numpy and Python, and every loader draw (with epoch, rank and batch)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA (if supported) and on CPUs with native bf16 (AVX512-BF16 or AMX), else none
    out_dir: str = "runs/default"  # config.yaml, metrics.jsonl, checkpoints (last.pt, best.pt, epoch_NNNN.pt) and reports
    log_interval: int = 50  # steps between metric reads (the only host syncs of a step)
    eval_every: int = 1  # evaluate on the test set every N epochs (and always after the last)
    select_best_on: Literal["overall", "last"] = "overall"  # best.pt: highest overall accuracy (CIFAR) or the last evaluated epoch
    keep_last: int = 2  # epoch_NNNN.pt files kept (besides last.pt and best.pt); 0 keeps all
    progress: bool = True  # tqdm progress bars of training, its evaluation and stage 2 (only on a terminal; not with --no-progress)
    deterministic: bool = False  # torch deterministic algorithms (warn only) and no cuDNN autotuning; slower
    max_steps_per_epoch: int = 0  # 0: whole epoch; >0 truncates (smoke tests)
    compile: bool = False  # torch.compile the forward + loss (minutes of compile time: for long runs)
    cuda_graphs: bool = False  # CUDA only: compile with mode="reduce-overhead" (CUDA graphs; static shapes)
    prefetch: bool = True  # host batches go to the device one step ahead (pinned, non_blocking, side stream)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest conv algorithms (off when deterministic)
    sync_bn: bool = False  # torchrun with N > 1: BatchNorm statistics over the global batch (SyncBatchNorm)
    max_nonfinite_steps: int = 5  # a non-finite loss skips its step; stop after this many in a row (0: never stop)
    handle_signals: bool = True  # SIGTERM / SIGINT: save a checkpoint at the next step boundary, then exit cleanly
    tensorboard: bool = True  # also write TensorBoard events when the tensorboard package is installed
    # Gradient accumulation: each rank's share of data.batch_size (still the global batch of one optimizer step) runs
    # as this many micro-batches, gradients summed before the one step; activation memory shrinks by this factor.
    # BatchNorm normalises with each micro-batch's statistics (docs/method.md §8). Not with train.cuda_graphs.
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.accumulate_steps, int) and self.accumulate_steps >= 1):
            raise ConfigError(f"train.accumulate_steps counts micro-batches per optimizer step and must be an integer >= 1, "
                              f"got {self.accumulate_steps!r}")


@dataclass(frozen=True)
class RouterConfig:
    """Stage 2 (docs/method.md §5): only the routers train, the stage-1 network is frozen.

    The first keys are the published recipe's. `router_data`, `heldout_per_class`,
    `calibrate_threshold`, `max_accuracy_drop`, `calibration_per_class` and `calibration_z` are options for data sets
    with unused images (mnist_lt, cifar*_lt), whose stage-1 networks memorise the training set; their
    defaults give the published stage 2.
    """

    top_k: int = 30  # top-k running-mean logits fed to the router (30 CIFAR/ResNet-10, 50 ResNet-50/iNat); <= classes
    hidden: int = 16  # width of each router's hidden layer
    share_fc: bool = True  # one final Linear(top_k + hidden -> 1) for all routers (the original's default)
    w_on: float = 100.0  # positive weight of the BCE ("call the next expert" is rare)
    threshold: float = 0.5  # in [0, 1]: call the next expert when sigmoid(r) > threshold (replaced when calibrate_threshold)
    router_data: Literal["train", "heldout"] = "train"  # where the router labels come from; heldout: images stage 1 never saw
    heldout_per_class: int = 100  # router_data=heldout: unused images per class that train the routers (at most)
    calibrate_threshold: bool = False  # choose router.threshold on other unused images (the cheapest within max_accuracy_drop)
    max_accuracy_drop: float = 1.0  # calibrate_threshold: points of accuracy the routed model may lose against all experts
    calibration_per_class: int = 50  # calibrate_threshold: unused images per class, disjoint from the router's
    calibration_z: float = 1.645  # calibrate_threshold: the drop plus this many standard errors must stay within max_accuracy_drop
    epochs: int = 5  # stage-2 epochs of class-balanced draws (an epoch = as many draws as training images)
    lr: float = 0.01  # SGD, Nesterov, cosine to 0 stepped per epoch
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay of the router parameters
    batch_size: int = 512  # images per stage-2 step

    @property
    def uses_heldout(self) -> bool:
        """Whether stage 2 needs images the long-tailed training set left out."""
        return self.router_data == "heldout" or self.calibrate_threshold

    def __post_init__(self) -> None:
        if self.router_data not in ("train", "heldout"):
            raise ConfigError(f"router.router_data must be 'train' or 'heldout', got {self.router_data!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"router.threshold must lie in [0, 1] (a probability), got {self.threshold}")
        for key in ("heldout_per_class", "calibration_per_class"):
            if getattr(self, key) < 1:
                raise ConfigError(f"router.{key}: held-out images per class must be >= 1, got {getattr(self, key)}")
        if not self.max_accuracy_drop >= 0:  # also NaN
            raise ConfigError(f"router.max_accuracy_drop is in points and must be >= 0, got {self.max_accuracy_drop}")
        if not self.calibration_z >= 0:
            raise ConfigError(f"router.calibration_z counts standard errors and must be >= 0, got {self.calibration_z}")


@dataclass(frozen=True)
class AnalysisConfig:
    """`ride-fast analyze` (ride_fast.analysis): bias/variance runs, two-stage classifiers, confusion."""

    out_dir: str = "runs/analysis"  # runs, reports and figures of `ride-fast analyze`
    runs: int = 5  # bias-variance: independent long-tailed training sets (the paper: 20)
    methods: Tuple[str, ...] = ("ce", "ldam", "ride")  # presets (ce, cb_ce, focal, ldam, ride, ride2..ride8) or recipe YAML paths
    head_fraction: float = 0.6  # bias-variance: the largest class draws this share of its pool (the paper: 300 of 500)
    workers: int = 1  # parallel training processes (several GPUs: shared out round-robin)
    two_stage_epochs: int = 10  # cRT / cosine: epochs over the frozen features
    two_stage_lr: float = 0.1  # SGD, momentum 0.9, cosine to 0 stepped per epoch
    two_stage_batch_size: int = 128  # cRT / cosine: batch of the classifier retraining
    two_stage_weight_decay: float = 5e-4  # cRT / cosine: weight decay of the classifier retraining
    two_stage_sampler: Literal["balanced", "shuffle"] = "balanced"  # cRT: class-balanced draws (epoch = N draws)
    tau_max: float = 2.0  # tau-norm: grid 0, tau_max / (tau_steps - 1), ..., tau_max
    tau_steps: int = 21  # tau-norm: points of the grid (>= 2)
    val_source: Literal["auto", "pool", "train"] = "auto"  # tau: unused images of the full training data, or a split of the training set
    val_per_class: int = 20  # tau: validation images per class (train: at most half of each class)
    confusion_bins: int = 20  # hardest-negative histograms over [0, 1]


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the network (docs/method.md §2)
    data: DataConfig = field(default_factory=DataConfig)  # data set and loaders (§7)
    loss: LossConfig = field(default_factory=LossConfig)  # stage-1 loss (§3)
    optim: OptimConfig = field(default_factory=OptimConfig)  # SGD and the per-epoch lr schedule (§8)
    distill: DistillConfig = field(default_factory=DistillConfig)  # self-distillation (§4)
    train: TrainConfig = field(default_factory=TrainConfig)  # the stage-1 run: device, precision, checkpoints
    router: RouterConfig = field(default_factory=RouterConfig)  # stage 2 (§5)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)  # `ride-fast analyze`


# --------------------------------------------------------------------------------------------
# conversion and validation


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_closest(str(value), map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (tuple, Tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_closest(str(key), names)}")
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build a validated Config from a (possibly partial) nested mapping."""
    return _build(Config, data or {}, "")


def _parse_scalar(text: str) -> Any:
    """Parse the value of a command-line override with YAML rules (1e-3, true, [1, 2], null)."""
    return yaml.safe_load(text) if text.strip() else ""


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """Turn ['optim.lr=0.05', 'model.num_experts=4'] into a nested mapping."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(
                f"override '{item}': the key must be dotted (section.key){_closest(key, [f.name for f in fields(Config)])}"
            )
        _set_dotted(data, key, _parse_scalar(text))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (only the keys that differ from the defaults), then apply overrides."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides))
    try:
        return config_from_dict(data)
    except ConfigError as err:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{err}") from None


def config_to_dict(cfg: Config) -> dict:
    """A plain nested dict (tuples as lists) suitable for YAML or JSON."""

    def plain(obj):
        if is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    return plain(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def update(cfg: Config, **sections: dict) -> Config:
    """Return a copy of cfg with some keys of some sections replaced (validated like a recipe)."""
    merged = _merge(config_to_dict(cfg), sections)
    return config_from_dict(merged)


__all__ = [
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RouterConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "update",
]
