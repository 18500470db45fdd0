"""Pictures: column titles on the grids."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ld_ext import viz


def test_grid_titles_add_a_header_row_above_the_columns(tmp_path):
    rows = [[np.full((32, 32, 3), c, np.uint8) for c in (100, 200)] for _ in range(2)]
    plain = np.asarray(Image.open(viz.save_grid(rows, tmp_path / "a.png")))
    titled = np.asarray(Image.open(viz.save_grid(rows, tmp_path / "b.png", titles=["image", "clusters"])))
    assert titled.shape[0] > plain.shape[0]  # a header band
    assert not (plain < 100).any()  # images and white borders only
    dark = np.argwhere((titled < 60).all(axis=2))  # black text
    assert len(dark) > 20 and dark[:, 0].max() < titled.shape[0] - plain.shape[0] * (titled.shape[1] // plain.shape[1])
    with pytest.raises(ValueError, match="one per column"):
        viz.save_grid(rows, tmp_path / "c.png", titles=["one"])
