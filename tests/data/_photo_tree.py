"""Small generated photo data sets for the data tests: real JPEG / PNG files of several sizes and
modes (RGB, grey, CMYK, RGBA, palette), long-tailed classes, and list / JSON / folder layouts.

A module of its own, not conftest.py: test files import these names, and `from conftest import`
would find whichever conftest.py (tests/analysis/ has one too) pytest imported last."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# class -> number of training images (long-tailed), 2 test images per class
TRAIN_COUNTS = [7, 4, 3, 2, 1]
TEST_PER_CLASS = 2
# (width, height, mode, format): sizes around ImageNet's, one smaller than the crop, odd sizes
VARIANTS = [
    (500, 375, "RGB", "JPEG"),
    (375, 500, "L", "JPEG"),
    (320, 240, "CMYK", "JPEG"),
    (333, 221, "RGB", "JPEG"),
    (160, 120, "RGB", "JPEG"),
    (256, 300, "RGBA", "PNG"),
    (300, 256, "P", "PNG"),
]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB picture (gradients, waves, a little noise) that JPEG handles well."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(8, 40), rng.uniform(8, 40), rng.uniform(0, 6)
    r = 128 + 80 * np.sin(x / fx + phase) * np.cos(y / fy)
    g = 255 * x / width
    b = 255 * y / height * rng.uniform(0.3, 1.0)
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save_image(path: Path, width: int, height: int, mode: str, fmt: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = photo(width, height, seed)
    if mode == "P":
        im = im.convert("P", palette=Image.ADAPTIVE)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_tree(root: Path) -> dict:
    """root/{train,val}/<class>/<image>, ImageNet-LT-style list files and iNaturalist-style JSON."""
    entries = {"train": [], "val": []}
    k = 0
    for split, counts in (("train", TRAIN_COUNTS), ("val", [TEST_PER_CLASS] * len(TRAIN_COUNTS))):
        for c, n in enumerate(counts):
            for j in range(n):
                w, h, mode, fmt = VARIANTS[k % len(VARIANTS)]
                ext = "JPEG" if fmt == "JPEG" else "png"
                rel = f"{split}/n{c:03d}/img_{k:03d}.{ext}"
                save_image(root / rel, w, h, mode, fmt, seed=k)
                entries[split].append((rel, c))
                k += 1
    (root / "ImageNet_LT_train.txt").write_text("".join(f"{p} {c}\n" for p, c in entries["train"]))
    (root / "ImageNet_LT_test.txt").write_text("".join(f"{p} {c}\n" for p, c in entries["val"]))
    for split, name in (("train", "train2018.json"), ("val", "val2018.json")):
        images = [{"id": 1000 + i, "file_name": p, "width": 0, "height": 0} for i, (p, _) in enumerate(entries[split])]
        anns = [{"id": i, "image_id": 1000 + i, "category_id": c} for i, (_, c) in enumerate(entries[split])]
        cats = [{"id": c, "name": f"species {c}"} for c in range(len(TRAIN_COUNTS))]
        (root / name).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return entries
