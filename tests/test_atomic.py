"""ld_ext.atomic, the one writer of files: temp name + rename, nothing left behind on errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from ld_ext import atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = atomic.atomic_write_text(tmp_path / "sub" / "a.txt", "old")
    assert path.read_text() == "old"

    def fail(f):
        f.write(b"half of the new cont")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic.atomic_write(path, fail)
    assert path.read_text() == "old" and _leftovers(path.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_json_png_writers(tmp_path):
    atomic.atomic_write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": np.arange(3), "c": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": str(tmp_path)}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic.atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _leftovers(tmp_path) == []
    img = np.array([[0.0, 0.5], [1.0, 2.0]])
    atomic.atomic_write_png(tmp_path / "i.png", img)
    atomic.atomic_write_png(tmp_path / "m.png", np.array([[True, False]]))
    assert np.asarray(Image.open(tmp_path / "i.png")).tolist() == [[0, 128], [255, 255]]
    assert np.asarray(Image.open(tmp_path / "m.png")).tolist() == [[255, 0]]
    with pytest.raises(ValueError, match="2D"):
        atomic.atomic_write_png(tmp_path / "x.png", np.zeros((2, 2, 2)))


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    with atomic.atomic_directory(tmp_path / "cache") as tmp:
        (tmp / "data").write_text("x")
        assert not (tmp_path / "cache").exists()
    assert (tmp_path / "cache" / "data").read_text() == "x"
    with pytest.raises(KeyError):
        with atomic.atomic_directory(tmp_path / "other") as tmp:
            (tmp / "data").write_text("x")
            raise KeyError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_checkpoint_and_tasks_use_the_same_writers():
    from ld_ext import checkpoint
    from ld_ext.tasks import common

    assert checkpoint.atomic_write is atomic.atomic_write
    assert checkpoint.atomic_write_bytes is atomic.atomic_write_bytes
    assert checkpoint.remove_stale_temp_files is atomic.remove_stale_temp_files
    assert common.atomic_write_json is atomic.atomic_write_json and common.atomic_savefig is atomic.atomic_savefig
