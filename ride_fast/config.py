"""Typed configuration: frozen dataclasses per section, YAML recipes, `section.key=value` overrides.

A recipe holds only what differs from the defaults below. Every key is checked: an unknown key or a
value of the wrong type raises `ConfigError` naming the dotted path and the closest valid key.
`dump_config` writes the fully resolved config (every run stores one next to its checkpoints).

This module is a leaf: it imports nothing from the rest of ride_fast.
"""
from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Tuple

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; `key` is the dotted key at fault (if one is)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# The names ride_fast.models registers and ride_fast.losses builds (a test keeps them equal): the
# config checks them itself, so `show-config` refuses an unknown name as `train` does.
MODEL_NAMES = ("resnet10", "resnet32", "resnet50", "resnext50_32x4d")
LOSS_NAMES = ("ride", "ce", "cb_ce", "ldam", "focal")
MIN_EXPERTS, MAX_EXPERTS = 1, 8
# train.device: auto, cpu, cuda, cuda:N, mps (torch's device strings that ride_fast runs on)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    """Raise a ConfigError naming `key` unless `ok`: '<key> <message>, got <value>'."""
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}", key)


def _check_name(key: str, value: str, names: tuple[str, ...]) -> None:
    if value not in names:
        raise ConfigError(f"{key}: unknown name {value!r}{_closest(str(value), names)}; valid names are {list(names)}", key)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet32"  # backbone: resnet32 (CIFAR) | resnet10 | resnet50 | resnext50_32x4d; see ride_fast.models.list_models()
    num_experts: int = 3  # E, expert branches on the shared trunk (1..8); 1 with reduce_dimension=false is the plain baseline
    reduce_dimension: bool = True  # narrow the per-expert stages (every RIDE recipe)
    use_norm: bool = True  # cosine classifier with s = 30; False: Linear with bias
    num_classes: int = 0  # 0: taken from the data set; otherwise it must equal the data set's class count
    channels_last: bool = True  # faster on CPUs (oneDNN) and GPUs (cuDNN NHWC); same results
    batched: bool = True  # all experts as one grouped network (models/batched.py); same results, either checkpoint layout loads

    def __post_init__(self) -> None:
        _check_name("model.name", self.name, MODEL_NAMES)
        _check(MIN_EXPERTS <= self.num_experts <= MAX_EXPERTS, "model.num_experts", f"must be in {MIN_EXPERTS}..{MAX_EXPERTS}",
               self.num_experts)
        _check(self.num_classes == 0 or self.num_classes >= 2, "model.num_classes", "must be 0 (from the data set) or >= 2",
               self.num_classes)


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
    num_workers: int = -1  # file loaders: DataLoader workers / DALI threads; -1 = one per CPU core this rank may use (the cores shared among a machine's ranks), 0 = in the main process
    verify_images: Literal["none", "header", "decode"] = "header"  # file data sets: image checks before training
    skip_bad_images: bool = False  # leave out missing / unreadable images (and say how many) instead of stopping
    seed: int = 0  # selection of the long-tailed subset (the original uses numpy seed 0)

    def __post_init__(self) -> None:
        _check(self.imbalance_factor >= 1, "data.imbalance_factor", "must be >= 1 (1 = balanced)", self.imbalance_factor)
        for key in ("batch_size", "eval_batch_size", "image_size", "test_per_class"):
            _check(getattr(self, key) >= 1, f"data.{key}", "must be >= 1", getattr(self, key))


@dataclass(frozen=True)
class LossConfig:
    name: str = "ride"  # ride (the RIDE loss, docs/method.md §3) | ce | cb_ce (class-balanced CE) | ldam (LDAM-DRW) | focal
    max_m: float = 0.5  # LDAM: largest margin
    s: float = 30.0  # cosine scale already applied in the model; margins are s * m_c
    diversity_factor: float = -0.45  # lambda; negative maximises the KL (-0.45 CIFAR, -0.2 ImageNet-LT / iNat); 0: no diversity term
    diversity: Literal["mean", "pairwise"] = "mean"  # mean: KL to the detached mean (original code); pairwise: the paper's formula
    individual: bool = True  # False: "collaborative", the classification loss on the mean logits
    zero_diversity_on_mean_logits: bool = False  # true: at diversity_factor == 0 exactly, as the original code: every expert's classification term on the mean logits (E x LDAM(mean)); docs/method.md §10
    classification: Literal["ldam", "ce", "focal"] = "ldam"  # per-expert term of the RIDE loss
    reweight: bool = True  # DRW: class-balanced weights and temperatures after reweight_epoch
    reweight_epoch: int = 160  # epochs 1..reweight_epoch unweighted, T = T_base; from reweight_epoch + 1 on DRW and T_c; -1: never
    reweight_factor: float = 0.05  # gamma of the distribution-aware temperatures (0.05 CIFAR, 0.02 ImageNet-LT, 0.015 iNat; 0..1)
    base_temperature: float = 1.0  # T_base of the diversity term (> 0)
    beta: float = 0.9999  # class-balanced (effective number) weights w_c = (1 - beta) / (1 - beta^n_c), in [0, 1)
    focal_gamma: float = 1.0  # focal loss exponent (>= 0; 0 is cross-entropy); name=focal or classification=focal
    impl: Literal["auto", "reference", "triton"] = "auto"  # auto: fused Triton kernel on CUDA, closed-form gradient on the CPU

    def __post_init__(self) -> None:
        _check_name("loss.name", self.name, LOSS_NAMES)
        _check(self.base_temperature > 0, "loss.base_temperature", "must be > 0", self.base_temperature)
        _check(0 <= self.beta < 1, "loss.beta", "must lie in [0, 1)", self.beta)
        _check(self.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0", self.focal_gamma)


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

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "is a learning rate and must be > 0", self.lr)  # also NaN
        _check(0 <= self.momentum < 1, "optim.momentum", "must lie in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0", self.warmup_epochs)
        _check(self.gamma > 0, "optim.gamma", "must be > 0", self.gamma)


@dataclass(frozen=True)
class DistillConfig:
    teacher_checkpoint: str = ""  # stage-1 checkpoint of the teacher (6 experts in the recipes); empty: no distillation
    temperature: float = 1.5  # T_d of the distillation KL (> 0)
    scale_by_experts: bool = True  # the original multiplies the loss by E (docs/method.md §4)
    teacher_bn_train: bool = True  # the original leaves the teacher's BatchNorm in training mode; false: eval mode

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "distill.temperature", "must be > 0", self.temperature)


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
    cuda_graphs: bool = False  # CUDA only: the whole step (forward to SGD update) captured as one CUDA graph per batch shape
    prefetch: bool = True  # host batches go to the device one step ahead (pinned, non_blocking, side stream)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest conv algorithms (off when deterministic)
    sync_bn: bool = False  # torchrun with N > 1: BatchNorm statistics over the global batch (SyncBatchNorm)
    max_nonfinite_steps: int = 5  # a non-finite loss skips its step; stop after this many in a row (0: never stop)
    handle_signals: bool = True  # SIGTERM / SIGINT: save a checkpoint at the next step boundary, then exit cleanly
    tensorboard: bool = True  # also write TensorBoard events when the tensorboard package is installed
    # Gradient accumulation: each rank's share of data.batch_size (still the global batch of one optimizer step) runs
    # as this many micro-batches, gradients summed before the one step; activation memory shrinks by this factor.
    # BatchNorm normalises with each micro-batch's statistics (docs/method.md §8).
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.accumulate_steps, int) and self.accumulate_steps >= 1, "train.accumulate_steps",
               "counts micro-batches per optimizer step and must be an integer >= 1", self.accumulate_steps)
        _check(DEVICE_PATTERN.fullmatch(self.device) is not None, "train.device", "must be auto, cpu, cuda, cuda:N or mps",
               self.device)
        for key in ("epochs", "log_interval", "eval_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1", getattr(self, key))
        for key in ("keep_last", "max_steps_per_epoch", "max_nonfinite_steps"):
            _check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0", getattr(self, key))


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
        _check(self.router_data in ("train", "heldout"), "router.router_data", "must be 'train' or 'heldout'", self.router_data)
        _check(0.0 <= self.threshold <= 1.0, "router.threshold", "must lie in [0, 1] (a probability)", self.threshold)
        for key in ("heldout_per_class", "calibration_per_class"):
            _check(getattr(self, key) >= 1, f"router.{key}", "(held-out images per class) must be >= 1", getattr(self, key))
        _check(self.max_accuracy_drop >= 0, "router.max_accuracy_drop", "is in points and must be >= 0", self.max_accuracy_drop)
        _check(self.calibration_z >= 0, "router.calibration_z", "counts standard errors and must be >= 0", self.calibration_z)
        for key in ("top_k", "hidden", "epochs", "batch_size"):
            _check(getattr(self, key) >= 1, f"router.{key}", "must be >= 1", getattr(self, key))
        _check(self.lr > 0, "router.lr", "is a learning rate and must be > 0", self.lr)


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


def _scalar(text: str, tp: Any) -> Any:
    """One item of a comma-separated list ("10,20"), read as YAML reads it unless the items are strings."""
    if tp is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            quote = " (YAML reads yes/no/on/off as true/false: quote the word)" if isinstance(value, bool) else ""
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_closest(str(value), map(str, args))}{quote}", path)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (tuple, Tuple):
        item_tp = args[0] if args else Any
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [_scalar(v, item_tp) for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}", path)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}", path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}", path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}", path)
    if tp is str:
        if isinstance(value, str):
            return value
        quote = " (YAML reads yes/no/on/off as true/false: quote the word)" if isinstance(value, bool) else ""
        raise ConfigError(f"{path}: expected a string, got {value!r}{quote}", path)
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
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}", dotted)
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build a validated Config from a (possibly partial) nested mapping."""
    return _build(Config, data or {}, "")


def _leaf_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: 'model.name', ..., 'analysis.confusion_bins'."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        dotted = f"{prefix}{f.name}"
        out += _leaf_keys(hints[f.name], f"{dotted}.") if is_dataclass(hints[f.name]) else [dotted]
    return out


def _suggest(dotted: str) -> str:
    """' (did you mean ...?)' from the full dotted keys: a key with the same last part ('lr' ->
    'optim.lr' or 'router.lr'; 'optm.lr' -> 'optim.lr'), else the closest dotted key."""
    keys = _leaf_keys()
    section, _, leaf = dotted.rpartition(".")
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        if section:  # a misspelt section: the closest of them
            same_leaf = difflib.get_close_matches(dotted, same_leaf, n=1, cutoff=0.0)
        return " (did you mean " + " or ".join(f"'{k}'" for k in same_leaf) + "?)"
    match = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _field_type(dotted: str) -> tuple[type, str, Any]:
    """(section dataclass, key, type) of a dotted leaf key; ConfigError with a suggestion otherwise."""
    parts = dotted.split(".")
    cls, tp = Config, Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if is_dataclass(cls) else {}
        if part not in hints:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}", dotted)
        tp = hints[part]
        if i < len(parts) - 1:
            cls = tp
    if is_dataclass(tp) or len(parts) != 2:
        raise ConfigError(f"'{dotted}' is not a key (section.key){_suggest(dotted)}", dotted)
    return cls, parts[-1], tp


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_value(text: str, tp: Any) -> Any:
    """The text of a command-line override as the key's type: a string stays the text as written
    ('yes' is not a bool), a bool takes true/false/yes/no/on/off/1/0, the rest YAML rules
    (1e-3, [60, 80], null)."""
    text = text.strip()
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return text
    if tp is bool and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    return yaml.safe_load(text) if text else ""


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
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
    """Turn ['optim.lr=0.05', 'model.num_experts=4'] into a nested mapping, each value parsed and
    checked as its key's type and rules; an error names the override as written."""
    data: dict = {}
    for item in overrides:
        try:
            if "=" not in item:
                raise ConfigError("an override must look like section.key=value")
            key, text = item.split("=", 1)
            key = key.strip()
            section_cls, name, tp = _field_type(key)
            value = _coerce(_parse_value(text, tp), tp, key)
            section_cls(**{name: value})  # the key's own rules (ranges, names), the other keys at their defaults
        except ConfigError as err:
            raise ConfigError(f"override '{item}': {err}", getattr(err, "key", None)) from None
        _set_dotted(data, key, value)
    return data


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """dotted key -> line (from 1) of a composed YAML mapping."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, f"{dotted}."))
    return lines


def _read_recipe(path: Path) -> tuple[dict, dict[str, int]]:
    """(mapping, dotted key -> line) of a YAML recipe; errors name the file and line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data, lines


def load_settings(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The keys a YAML recipe and the overrides set, as a nested mapping (nothing filled in from the
    defaults), checked like a whole config. An error names its source: the override as written, or
    the recipe's file and line. For commands whose base is a checkpoint's config (`ride-fast route`)."""
    data: dict = {}
    lines: dict[str, int] = {}
    if path:
        path = Path(path)
        data, lines = _read_recipe(path)
    data = _merge(data, parse_overrides(overrides))
    try:
        config_from_dict(data)
    except ConfigError as err:
        key = (getattr(err, "key", None) or "").split("[")[0]
        from_override = [o for o in overrides if o.split("=", 1)[0].strip() == key]
        if from_override:
            raise ConfigError(f"override '{from_override[-1]}': {err}", key) from None
        if not path:
            raise
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        raise ConfigError(f"{where}: {err}", key) from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (only the keys that differ from the defaults), then apply overrides (see `load_settings`)."""
    return config_from_dict(load_settings(path, overrides))


def config_to_dict(cfg: Config) -> dict:
    """A plain nested dict (tuples as lists) suitable for YAML or JSON."""

    def plain(obj):
        if is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    return plain(cfg)


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key whose value differs, in schema order."""
    a, b = config_to_dict(old), config_to_dict(new)
    return [(f"{s}.{k}", a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]]


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
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_settings",
    "parse_overrides",
    "update",
]
