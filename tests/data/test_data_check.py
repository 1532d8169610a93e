"""Bad input: `ride-fast data check` and the fail-fast checks of training report every problem
with its file and line, or leave unreadable images out with data.skip_bad_images=true."""
import logging
import re

import pytest
import yaml

from _photo_tree import TRAIN_COUNTS, photo
from ride_fast.cli import main
from ride_fast.config import DataConfig
from ride_fast.data import DataError, build_datasets
from ride_fast.data.check import check_data
from ride_fast.data.verify import decode_problem, header_problem, image_format


def cfg(root, **kw) -> DataConfig:
    base = dict(name="imagenet_lt", root=str(root), num_classes=len(TRAIN_COUNTS), image_size=224, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def _lines(root, split="train"):
    return (root / f"ImageNet_LT_{split}.txt").read_text().splitlines()


def _path(root, lineno, split="train"):
    return root / _lines(root, split)[lineno - 1].rsplit(" ", 1)[0]


def damage(root) -> dict:
    """Break the tree in every way the checks must catch; returns {what: (list line, path)}."""
    out = {}
    p = _path(root, 1)  # truncated JPEG
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    out["truncated"] = (1, p)
    p = _path(root, 2)  # empty file
    p.write_bytes(b"")
    out["empty"] = (2, p)
    p = _path(root, 3)  # not an image at all
    p.write_text("<html>404 Not Found</html>")
    out["not_image"] = (3, p)
    p = _path(root, 4)  # missing
    p.unlink()
    out["missing"] = (4, p)
    p = _path(root, 5)  # a valid JPEG with bytes after its end marker: must pass
    p.write_bytes(p.read_bytes() + b"\x00" * 5000)
    out["trailing"] = (5, p)
    return out


def test_image_formats_are_recognised(photo_tree):
    files = sorted(photo_tree.rglob("*.JPEG"))[:1] + sorted(photo_tree.rglob("*.png"))[:1]
    assert [image_format(f.read_bytes()[:16]) for f in files] == ["JPEG", "PNG"]
    assert image_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    assert image_format(b"P6\n32 32\n255\n") == "PNM"
    assert image_format(b"hello world") is None
    for f in files:
        assert header_problem(str(f)) is None and decode_problem(str(f)) is None


def test_every_bad_image_is_found_at_both_levels(fresh_tree):
    bad = damage(fresh_tree)
    for check in (header_problem, decode_problem):
        assert check(str(bad["truncated"][1]))[0] == "unreadable"
        assert check(str(bad["empty"][1]))[0] == "unreadable"
        assert check(str(bad["not_image"][1]))[0] == "unreadable"
        assert check(str(bad["missing"][1])) == ("missing", "image not found")
        assert check(str(bad["trailing"][1])) is None
    assert "truncated" in header_problem(str(bad["truncated"][1]))[1]
    assert header_problem(str(bad["not_image"][1]))[1].startswith("not an image (starts with b'<html>")


def test_training_fails_fast_naming_list_lines(fresh_tree):
    bad = damage(fresh_tree)
    with pytest.raises(DataError) as err:
        build_datasets(cfg(fresh_tree))
    text = str(err.value)
    train_list = fresh_tree / "ImageNet_LT_train.txt"
    assert "the data set has problems" in text and "data.skip_bad_images=true" in text
    assert f"{train_list}:1: cannot decode (image file is truncated" in text and str(bad["truncated"][1]) in text
    assert "Error:" not in text  # PIL's words, not its exception class (OSError: ...)
    assert f"{train_list}:2: empty file: {bad['empty'][1]}" in text
    assert f"{train_list}:3: not an image" in text
    assert f"{train_list}:4: image not found: {bad['missing'][1]}" in text
    assert f"{train_list}:5:" not in text
    assert len(err.value.problems) == 4


def test_skip_bad_images_leaves_them_out_and_says_how_many(fresh_tree, caplog):
    damage(fresh_tree)
    with caplog.at_level(logging.WARNING, logger="ride_fast.data"):
        train, test = build_datasets(cfg(fresh_tree, skip_bad_images=True))
    assert len(train) == sum(TRAIN_COUNTS) - 4 and len(test) == 2 * len(TRAIN_COUNTS)
    assert "left out 4 unreadable or missing images (4 training, 0 test)" in caplog.text
    assert train.where(0) == f"{fresh_tree / 'ImageNet_LT_train.txt'}:5"


def test_skipping_cannot_hide_an_emptied_class(fresh_tree):
    lines = _lines(fresh_tree)
    last = lines[-1]  # the only image of the last class
    (fresh_tree / last.rsplit(" ", 1)[0]).write_bytes(b"")
    with pytest.raises(DataError, match=r"class 4 has no training image after leaving out 1 unreadable images"):
        build_datasets(cfg(fresh_tree, skip_bad_images=True))


def test_malformed_lines_are_never_skipped(fresh_tree):
    with open(fresh_tree / "ImageNet_LT_test.txt", "a") as fh:
        fh.write("just_a_path.jpg\n")
    n = len(_lines(fresh_tree, "test"))
    with pytest.raises(DataError, match=rf"ImageNet_LT_test.txt:{n}: expected '<image path> <label>'"):
        build_datasets(cfg(fresh_tree, skip_bad_images=True))


def test_data_check_command_reports_everything(fresh_tree, tmp_path, capsys):
    damage(fresh_tree)
    with open(fresh_tree / "ImageNet_LT_train.txt", "a") as fh:
        fh.write("extra.jpg 9\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "imagenet_lt", "root": str(fresh_tree), "num_classes": 5}}))
    assert main(["data", "check", "--config", str(recipe), "--threads", "2"]) == 1
    out = capsys.readouterr().out
    n = len(_lines(fresh_tree))
    assert f"ImageNet_LT_train.txt:{n}: label 9 out of range [0, 5)" in out
    assert "problems (5: 1 label, 1 missing, 3 unreadable)" in out
    assert "ImageNet_LT_train.txt:1: cannot decode" in out
    assert "class sizes, head to tail" in out and "imbalance ratio: 7 / 1 = 7.0" in out  # the list as given
    assert "few          5 classes" in out


def test_data_check_clean_data(photo_tree):
    report = check_data(cfg(photo_tree), level="header")
    assert report.ok and len(report.train) == sum(TRAIN_COUNTS)
    text = report.format()
    assert "no problems found" in text and "imbalance ratio: 7 / 1 = 7.0" in text
    # head to tail: the bars shrink
    bars = [line.count("#") for line in text.splitlines() if line.strip().startswith("classes ")]
    assert bars == sorted(bars, reverse=True) and len(bars) == 5


def test_data_check_of_a_data_set_held_in_memory(capsys):
    assert main(["data", "check", "data.name=mnist_lt"]) == 0
    out = capsys.readouterr().out
    assert "imbalance ratio: 400 / 4 = 100.0" in out and "many         3 classes" in out


def test_data_check_names_an_empty_class(fresh_tree):
    lines = _lines(fresh_tree)
    (fresh_tree / "ImageNet_LT_train.txt").write_text("\n".join(lines[:-1]) + "\n")  # drop the only image of class 4
    report = check_data(cfg(fresh_tree), level="none")
    assert [p.kind for p in report.problems] == ["empty_class"]
    assert report.problems[0].message == "imagenet_lt/train: class 4 has no training image"


def test_trainer_fails_fast_with_the_same_messages(fresh_tree):
    from ride_fast.config import config_from_dict
    from ride_fast.engine import Trainer

    damage(fresh_tree)
    config = config_from_dict({"data": {"name": "imagenet_lt", "root": str(fresh_tree), "num_classes": 5},
                               "train": {"device": "cpu"}})
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt:4: image not found"):
        Trainer(config, log=lambda s: None)


def test_greyscale_and_cmyk_photos_pass_the_checks(tmp_path):
    for mode in ("L", "CMYK", "RGB"):
        im = photo(64, 48, 0).convert(mode)
        im.save(tmp_path / f"{mode}.jpg", "JPEG")
        assert header_problem(str(tmp_path / f"{mode}.jpg")) is None
        assert decode_problem(str(tmp_path / f"{mode}.jpg")) is None


def test_decode_problems_are_said_in_words_without_python_class_names(tmp_path):
    head_only = tmp_path / "head_only.jpg"  # a JPEG signature, then garbage: PIL cannot tell what it is
    head_only.write_bytes(b"\xff\xd8\xff garbage")
    whole = tmp_path / "whole.png"
    photo(40, 30, 0).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:120])
    assert decode_problem(str(head_only)) == ("unreadable", "cannot decode (not an image format PIL reads, or its header is damaged)")
    kind, reason = decode_problem(str(cut))
    assert kind == "unreadable" and reason.startswith("cannot decode (") and len(reason) > len("cannot decode ()")
    for text in (reason, *header_problem(str(head_only))):
        assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", text), text
