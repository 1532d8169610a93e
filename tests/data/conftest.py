"""Fixtures of the data tests: the generated photo data set of _photo_tree.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _photo_tree import make_tree


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """A read-only long-tailed photo data set (do not modify: copy it with `fresh_tree`)."""
    root = tmp_path_factory.mktemp("photos")
    make_tree(root)
    return root


@pytest.fixture
def fresh_tree(photo_tree, tmp_path) -> Path:
    """A private copy of the photo data set that a test may damage."""
    dst = tmp_path / "photos"
    shutil.copytree(photo_tree, dst)
    return dst
