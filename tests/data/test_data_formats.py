"""Readers of the benchmarks' file formats: list files, iNaturalist JSON, class folders."""
import json

import numpy as np
import pytest
import torch

from _photo_tree import TEST_PER_CLASS, TRAIN_COUNTS
from ride_fast.config import DataConfig
from ride_fast.data import DataError, ImageListDataset, build_datasets, split_of_classes
from ride_fast.data.image_list import (
    IMAGENET_MEAN,
    INAT_MEAN,
    read_json_annotations,
    read_list_file,
    scan_image_folder,
)


def cfg(**kw) -> DataConfig:
    base = dict(image_size=224, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_list_file_lines_spaces_comments_crlf_bom(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(
        "\ufeffa/b.jpg 0\r\n".encode()
        + b"# a comment\n\n"
        + b"dir with space/c d.JPEG\t3\n"
        + b"/abs/e.png 2   \n"
    )
    s = read_list_file(path, tmp_path / "root")
    assert not s.problems
    assert s.files == [str(tmp_path / "root" / "a/b.jpg"), str(tmp_path / "root" / "dir with space/c d.JPEG"), "/abs/e.png"]
    assert s.labels == [0, 3, 2] and s.positions == [1, 4, 5]


def test_malformed_list_lines_name_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"ok.jpg 1\nlonely_path.jpg\nx.jpg cat\n\xff\xfe.jpg 2\nfine.jpg 0\n")
    s = read_list_file(path, tmp_path)
    msgs = [p.message for p in s.problems]
    assert len(msgs) == 3
    assert msgs[0].startswith(f"{path}:2: expected '<image path> <label>'")
    assert msgs[1] == f"{path}:3: label 'cat' is not an integer"
    assert msgs[2].startswith(f"{path}:4: not valid UTF-8")
    assert s.labels == [1, 0] and s.positions == [1, 5]


def test_imagenet_lt_from_list_files(photo_tree):
    train, test = build_datasets(cfg(name="imagenet_lt", root=str(photo_tree), num_classes=len(TRAIN_COUNTS)))
    assert isinstance(train, ImageListDataset) and train.num_classes == len(TRAIN_COUNTS)
    assert train.class_counts().tolist() == TRAIN_COUNTS
    assert test.class_counts().tolist() == [TEST_PER_CLASS] * len(TRAIN_COUNTS)
    assert train.name == "imagenet_lt/train" and train.mean == IMAGENET_MEAN
    assert train.recipe.jitter == 0.4 and train.recipe.crop_size == 224 and train.recipe.resize_size == 256
    assert train.where(0) == f"{photo_tree / 'ImageNet_LT_train.txt'}:1"
    masks = split_of_classes(train.class_counts())
    assert all(m.shape == (len(TRAIN_COUNTS),) for m in masks.values())


def test_imagenet_lt_defaults_to_1000_classes(photo_tree):
    # 1000 classes with images in only 5 of them: every empty class is reported
    with pytest.raises(DataError, match=r"class 5 has no training image") as err:
        build_datasets(cfg(name="imagenet_lt", root=str(photo_tree), verify_images="none"))
    assert "(995)" in str(err.value)


def test_inat_json_and_list_agree(photo_tree, tmp_path):
    a_train, a_test = build_datasets(cfg(name="inat2018", root=str(photo_tree)))  # no iNaturalist18_*.txt: the JSON files
    assert a_train.source.endswith("train2018.json") and a_train.num_classes == len(TRAIN_COUNTS)
    assert a_train.mean == INAT_MEAN and a_train.recipe.jitter == 0.0
    assert a_train.where(2) == f"{photo_tree / 'train2018.json'}: images[2]"
    b_train, b_test = build_datasets(cfg(name="inat2018", root=str(photo_tree), num_classes=len(TRAIN_COUNTS),
                                         train_list="ImageNet_LT_train.txt", test_list="ImageNet_LT_test.txt"))
    assert a_train.files == b_train.files and torch.equal(a_train.labels, b_train.labels)
    assert a_test.files == b_test.files and torch.equal(a_test.labels, b_test.labels)


def test_json_category_ids_are_numbered_in_sorted_order(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 70}, {"image_id": 2, "category_id": 5}, {"image_id": 3, "category_id": 99}],
            "categories": [{"id": 99}, {"id": 5}, {"id": 70}]}
    (tmp_path / "t.json").write_text(json.dumps(data))
    s = read_json_annotations(tmp_path / "t.json", tmp_path)
    assert s.labels == [1, 0, 2] and s.num_classes == 3
    # the evaluation file uses the training numbering; an unknown category is a problem
    data["annotations"][2]["category_id"] = 12
    (tmp_path / "v.json").write_text(json.dumps(data))
    v = read_json_annotations(tmp_path / "v.json", tmp_path, "test", category_ids=[5, 70, 99])
    assert v.labels == [1, 0] and "images[2]: category_id 12 is not among the 3 categories" in v.problems[0].message


def test_bad_json_files_are_named(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [1, 2,,]}')
    s = read_json_annotations(tmp_path / "broken.json", tmp_path)
    assert "broken.json: not valid JSON" in s.problems[0].message and "line 1 column" in s.problems[0].message
    (tmp_path / "test2018.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    s = read_json_annotations(tmp_path / "test2018.json", tmp_path)
    assert "has no 'annotations'" in s.problems[0].message
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 0}, {"image_id": 9}]}
    (tmp_path / "partial.json").write_text(json.dumps(data))
    msgs = [p.message for p in read_json_annotations(tmp_path / "partial.json", tmp_path).problems]
    assert any("annotations[1]: needs 'image_id' and 'category_id'" in m for m in msgs)
    assert any("images[1]: needs 'id' and 'file_name'" in m for m in msgs)
    assert any("images[2] (id 3): no annotation gives its category" in m for m in msgs)


def test_image_folder_classes_in_sorted_order(photo_tree, tmp_path):
    train, test = build_datasets(cfg(name="image_folder", root=str(photo_tree)))
    assert train.class_names == [f"n{c:03d}" for c in range(len(TRAIN_COUNTS))]
    assert train.class_counts().tolist() == TRAIN_COUNTS and len(test) == TEST_PER_CLASS * len(TRAIN_COUNTS)
    ref, _ = build_datasets(cfg(name="imagenet_lt", root=str(photo_tree), num_classes=len(TRAIN_COUNTS)))
    assert sorted(train.files) == sorted(ref.files)
    # an evaluation class the training folder lacks is reported
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    s = scan_image_folder(tmp_path / "val", "test", class_names=["b"])
    assert "class 'zebra' is not a training class" in s.problems[0].message


def test_user_list_dataset_needs_its_lists(photo_tree):
    with pytest.raises(ValueError, match=r"data.train_list must name the list file"):
        build_datasets(cfg(name="image_list", root=str(photo_tree)))
    with pytest.raises(FileNotFoundError, match=r"data.test_list: .*nope.txt not found"):
        build_datasets(cfg(name="image_list", root=str(photo_tree), train_list="ImageNet_LT_train.txt", test_list="nope.txt"))
    train, test = build_datasets(cfg(name="image_list", root=str(photo_tree), train_list="ImageNet_LT_train.txt",
                                     test_list=str(photo_tree / "ImageNet_LT_test.txt"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert train.num_classes == len(TRAIN_COUNTS)  # max label + 1
    assert train.mean == (0.5, 0.5, 0.5) and train.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="data.root must name"):
        build_datasets(cfg(name="imagenet_lt"))
    with pytest.raises(ValueError, match="did you mean 'inat2018'"):
        build_datasets(cfg(name="inat2019"))


def test_labels_out_of_range_fail_fast_with_file_and_line(fresh_tree):
    lines = (fresh_tree / "ImageNet_LT_train.txt").read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 7"
    lines[5] = lines[5].rsplit(" ", 1)[0] + " -1"
    (fresh_tree / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(name="imagenet_lt", root=str(fresh_tree), num_classes=5, verify_images="none"))
    text = str(err.value)
    assert "ImageNet_LT_train.txt:4: label 7 out of range [0, 5)" in text
    assert "ImageNet_LT_train.txt:6: label -1 out of range [0, 5)" in text


def test_dataset_subset_keeps_positions(photo_tree):
    train, _ = build_datasets(cfg(name="imagenet_lt", root=str(photo_tree), num_classes=5))
    sub = train.subset(np.array([2, 4]))
    assert sub.files == [train.files[2], train.files[4]] and sub.where(1) == train.where(4)
    assert sub.labels.tolist() == [train.labels[2].item(), train.labels[4].item()]
