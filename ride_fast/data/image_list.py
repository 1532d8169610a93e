"""Photo data sets read from files: ImageNet-LT, iNaturalist 2018 and any user data set.

Shape legend: N images, C classes.

Three on-disk formats are read, chosen by what the path names:

- a list file, one `relative/path.jpg label` per line (ImageNet_LT_*.txt, iNaturalist18_*.txt);
  blank lines and `#` comments are skipped, the path may contain spaces (the label is the last
  field), paths are relative to `data.root` (absolute ones are kept);
- a JSON annotation file in the iNaturalist / COCO layout (train2018.json, val2018.json):
  images[].{id, file_name}, annotations[].{image_id, category_id}, categories[].id;
- a folder of class subfolders (`train/<class>/<image>`), classes numbered in sorted order.

Reading never opens an image: a malformed line, a bad label or a class without an image is
reported as a `Problem` naming the file and line; `ride_fast.data.verify` checks the images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ride_fast.data.dataset import Problem, check_labels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".jp2")


@dataclass(frozen=True)
class ImageRecipe:
    """How photos are augmented (docs/method.md §7).

    Training: RandomResizedCrop(crop_size, scale, ratio), horizontal flip, colour jitter of
    brightness/contrast/saturation `jitter` (0: none), normalise.
    Evaluation: resize the shorter side to `resize_size`, center crop `crop_size`, normalise.
    """

    crop_size: int = 224
    resize_size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter: float = 0.0
    flip: bool = True

    def __post_init__(self):
        if self.crop_size < 1 or self.resize_size < self.crop_size:
            raise ValueError(f"image recipe: need 1 <= crop_size <= resize_size, got {self.crop_size} and {self.resize_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"image recipe: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"image recipe: colour jitter must lie in [0, 1), got {self.jitter}")


@dataclass
class ImageListDataset:
    """Image files and their labels; images are decoded by the loaders (DALI or torch)."""

    files: list[str]  # [N] path of each image (joined with the root)
    labels: Tensor  # [N] int64
    num_classes: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = ""
    recipe: ImageRecipe = field(default_factory=ImageRecipe)
    source: str = ""  # the list / JSON file the samples came from ("" for a folder)
    positions: np.ndarray | None = None  # [N] line number in `source` (list) or index into images[] (JSON)
    class_names: list[str] | None = None

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (len(self.files),):
            raise ValueError(f"{self.name}: {len(self.files)} files but labels have shape {tuple(self.labels.shape)}")
        check_labels(self.labels, self.num_classes, self.name)

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)

    def where(self, i: int) -> str:
        """Where image i is declared: `list.txt:LINE`, `file.json: images[K]` or its path."""
        if not self.source or self.positions is None:
            return self.files[i]
        return declared_at(self.source, int(self.positions[i]))

    def subset(self, keep) -> "ImageListDataset":
        """The images at positions `keep` (e.g. after leaving out unreadable ones)."""
        keep = np.asarray(keep, dtype=np.int64)
        return replace(
            self,
            files=[self.files[i] for i in keep],
            labels=self.labels[torch.from_numpy(keep)],
            positions=None if self.positions is None else self.positions[keep],
        )


@dataclass
class Samples:
    """What a reader found: files, labels, where each was declared, and the problems."""

    files: list[str]
    labels: list[int]
    positions: list[int]
    problems: list[Problem]
    source: str = ""
    class_names: list[str] | None = None
    num_classes: int = 0  # known from the file (JSON categories, folder classes); 0: unknown


# ----------------------------------------------------------------------------------- readers


def declared_at(source: str, position: int) -> str:
    """`list.txt:LINE` for a list file, `file.json: images[K]` for JSON annotations."""
    return f"{source}: images[{position}]" if source.endswith(".json") else f"{source}:{position}"


def read_list_file(path: str | Path, root: str | Path, split: str = "train") -> Samples:
    """Read `relative/path label` lines; every malformed line becomes a Problem naming file:line."""
    path = Path(path)
    root = Path(root) if root else Path()
    out = Samples([], [], [], [], source=str(path))

    def bad(lineno: int, text: str) -> None:
        out.problems.append(Problem("malformed", f"{path}:{lineno}: {text}", split=split))

    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad(lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            line = line.lstrip("\ufeff").strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(None, 1)
            if len(fields) != 2:
                bad(lineno, f"expected '<image path> <label>', got {line[:80]!r}")
                continue
            name, label = fields
            try:
                value = int(label)
            except ValueError:
                bad(lineno, f"label {label[:40]!r} is not an integer")
                continue
            out.files.append(os.path.join(root, name))
            out.labels.append(value)
            out.positions.append(lineno)
    return out


def read_json_annotations(path: str | Path, root: str | Path, split: str = "train",
                          category_ids: list[int] | None = None) -> Samples:
    """Read iNaturalist / COCO-style annotations. Category ids are numbered in sorted order
    (iNaturalist 2018: ids 0..8141, so label = category_id); pass the training file's
    `category_ids` when reading the evaluation file so both use one numbering."""
    path = Path(path)
    root = Path(root) if root else Path()
    out = Samples([], [], [], [], source=str(path))

    def bad(msg: str, kind: str = "malformed") -> Samples:
        out.problems.append(Problem(kind, f"{path}: {msg}", split=split))
        return out

    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        return bad(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})")
    except UnicodeDecodeError as err:
        return bad(f"not valid UTF-8 JSON ({err.reason})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return bad("expected a JSON object with a list 'images' (and 'annotations', 'categories')")
    annotations = data.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        return bad("has no 'annotations' (the iNaturalist test set is unlabelled: evaluate on val2018.json)")
    label_of: dict = {}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            bad(f"annotations[{k}]: needs 'image_id' and 'category_id'")
            continue
        label_of[ann["image_id"]] = ann["category_id"]
    if category_ids is None:
        cats = data.get("categories")
        if isinstance(cats, list) and cats and all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in cats):
            category_ids = sorted(c["id"] for c in cats)
    if category_ids is not None:
        number = {cid: i for i, cid in enumerate(category_ids)}
        out.num_classes = len(category_ids)
        out.class_names = [str(c) for c in category_ids]
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            bad(f"images[{k}]: needs 'id' and 'file_name'")
            continue
        if img["id"] not in label_of:
            bad(f"images[{k}] (id {img['id']}): no annotation gives its category")
            continue
        cid = label_of[img["id"]]
        if not isinstance(cid, int):
            bad(f"images[{k}]: category_id {cid!r} is not an integer")
            continue
        if category_ids is not None:
            if cid not in number:
                bad(f"images[{k}]: category_id {cid} is not among the {len(category_ids)} categories", "label")
                continue
            cid = number[cid]
        out.files.append(os.path.join(root, img["file_name"]))
        out.labels.append(cid)
        out.positions.append(k)
    return out


def scan_image_folder(folder: str | Path, split: str = "train", class_names: list[str] | None = None) -> Samples:
    """Images under `folder/<class>/...` (any depth), classes in sorted order of their folder names.
    With `class_names` (the training classes), the evaluation folder uses the same numbering."""
    folder = Path(folder)
    out = Samples([], [], [], [], source="")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_names is None:
        class_names = found
        if not found:
            out.problems.append(Problem("malformed", f"{folder}: no class subfolders (expected <class>/<image> in it)", split=split))
    number = {c: i for i, c in enumerate(class_names)}
    for name in found:
        if name not in number:
            out.problems.append(Problem("split", f"{folder / name}: class '{name}' is not a training class", split=split))
            continue
        for dirpath, dirnames, filenames in sorted(os.walk(folder / name, followlinks=True)):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    out.files.append(os.path.join(dirpath, f))
                    out.labels.append(number[name])
                    out.positions.append(0)
    out.class_names = list(class_names)
    out.num_classes = len(class_names)
    return out


def read_samples(path: str | Path, root: str | Path, split: str = "train", **kw) -> Samples:
    """Dispatch on what `path` is: a folder, a .json annotation file or a list file."""
    path = Path(path)
    if path.is_dir():
        return scan_image_folder(path, split, kw.get("class_names"))
    if path.suffix.lower() == ".json":
        return read_json_annotations(path, root, split, kw.get("category_ids"))
    return read_list_file(path, root, split)


# ----------------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class FileDatasetSpec:
    """Defaults of a named file data set (docs/method.md §7)."""

    train: tuple[str, ...]  # candidate names of the training list, first existing one wins
    test: tuple[str, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    jitter: float


FILE_DATASETS = {
    "imagenet_lt": FileDatasetSpec(("ImageNet_LT_train.txt",), ("ImageNet_LT_test.txt",), 1000, IMAGENET_MEAN, IMAGENET_STD, 0.4),
    "inat2018": FileDatasetSpec(("iNaturalist18_train.txt", "train2018.json"), ("iNaturalist18_val.txt", "val2018.json"),
                                8142, INAT_MEAN, INAT_STD, 0.0),
    "image_list": FileDatasetSpec((), (), 0, IMAGENET_MEAN, IMAGENET_STD, 0.0),
    "image_folder": FileDatasetSpec(("train",), ("val", "test"), 0, IMAGENET_MEAN, IMAGENET_STD, 0.0),
}


def _locate(root: Path, given: str, candidates: tuple[str, ...], key: str, dataset: str) -> Path:
    """The list / folder for `data.<key>`: as given (absolute, under root, or relative to the working
    directory), else the first of the data set's standard names found under root."""
    if given:
        p = Path(given)
        options = [p] if p.is_absolute() else [root / p, p]
        for option in options:
            if option.exists():
                return option
        raise FileNotFoundError(f"data.{key}: {options[0]} not found" + (f" (nor {options[1]})" if len(options) > 1 else ""))
    for name in candidates:
        if (root / name).exists():
            return root / name
    if not candidates:
        split = key.split("_")[0]
        raise ValueError(f"data.{key} must name the list file (or folder) of the {split} images for data.name={dataset}")
    raise FileNotFoundError(f"data.{key}: none of {', '.join(candidates)} found under data.root={root}; set data.{key}")


def read_file_datasets(cfg) -> tuple[ImageListDataset, ImageListDataset, list[Problem]]:
    """(train, test, problems) of a file data set described by a `DataConfig`.

    Malformed lines and unknown classes are left out and returned as problems; labels are
    checked against the number of classes (data.num_classes, else the data set's, else max + 1).
    Images are not opened here (see ride_fast.data.verify).
    """
    spec = FILE_DATASETS[cfg.name]
    if not cfg.root and cfg.name != "image_list":
        raise ValueError(f"data.root must name the folder holding the images for data.name={cfg.name}")
    root = Path(cfg.root) if cfg.root else Path()
    if cfg.root and not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder")
    train_path = _locate(root, cfg.train_list, spec.train, "train_list", cfg.name)
    test_path = _locate(root, cfg.test_list, spec.test, "test_list", cfg.name)
    train = read_samples(train_path, root, "train")
    # the evaluation set uses the training numbering: class folder names or JSON category ids
    same_folders = train.class_names if train_path.is_dir() else None
    same_ids = [int(c) for c in train.class_names] if train.class_names and train_path.suffix == ".json" else None
    test = read_samples(test_path, root, "test", class_names=same_folders, category_ids=same_ids)
    problems = train.problems + test.problems

    # data.num_classes, else what the file says (JSON categories, class folders), else the named
    # benchmark's (1000, 8142), else the largest label + 1.
    num_classes = cfg.num_classes or train.num_classes or spec.num_classes or max(train.labels + test.labels + [-1]) + 1
    for samples, split in ((train, "train"), (test, "test")):
        labels = np.asarray(samples.labels, dtype=np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        for i in bad:
            hint = "" if cfg.num_classes else " (set data.num_classes if the data set has more classes)"
            where = declared_at(samples.source, samples.positions[i])
            problems.append(Problem("label", f"{where}: label {labels[i]} out of range [0, {num_classes}){hint}", split=split))
        if len(bad):
            keep = np.setdiff1d(np.arange(len(labels)), bad)
            samples.files = [samples.files[i] for i in keep]
            samples.labels = labels[keep].tolist()
            samples.positions = [samples.positions[i] for i in keep]

    jitter = spec.jitter if cfg.color_jitter is None else cfg.color_jitter
    recipe = ImageRecipe(crop_size=cfg.image_size, resize_size=cfg.resize_size or round(cfg.image_size * 8 / 7), jitter=jitter)
    mean = tuple(cfg.mean) or spec.mean
    std = tuple(cfg.std) or spec.std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"data.mean and data.std need 3 values (R, G, B), got {mean} and {std}")

    def make(samples: Samples, split: str) -> ImageListDataset:
        return ImageListDataset(
            files=samples.files, labels=torch.tensor(samples.labels, dtype=torch.int64), num_classes=num_classes,
            mean=mean, std=std, name=f"{cfg.name}/{split}", recipe=recipe, source=samples.source,
            positions=np.asarray(samples.positions, dtype=np.int64), class_names=train.class_names,
        )

    return make(train, "train"), make(test, "test"), problems


__all__ = [
    "FILE_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INAT_MEAN",
    "INAT_STD",
    "ImageListDataset",
    "ImageRecipe",
    "Samples",
    "declared_at",
    "read_file_datasets",
    "read_json_annotations",
    "read_list_file",
    "read_samples",
    "scan_image_folder",
]
