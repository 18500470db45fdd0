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


def test_cluster_overlay_draws_the_masked_out_background_in_one_neutral_colour():
    import torch

    img = torch.full((1, 8, 8), 0.5)
    labels = torch.arange(64).reshape(8, 8) % 5  # a different cluster almost everywhere ("rings")
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    out = viz.overlay_clusters(img, labels, 5, alpha=0.7, mask=mask)
    assert (out[~mask.numpy()] == viz.NEUTRAL_RGB).all()
    assert len({tuple(c) for c in out[mask.numpy()]}) > 1  # clusters stay coloured inside the mask
    with pytest.raises(ValueError, match="mask must have shape"):
        viz.overlay_clusters(img, labels, 5, mask=mask[:4])


def test_label_maps_figure_has_titles_a_legend_and_a_readable_size(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 64, 64, generator=g)
    tissue = torch.randint(0, 4, (4, 64, 64), generator=g)
    clusters = torch.randint(0, 16, (4, 64, 64), generator=g)
    columns = [
        viz.LabelColumn("image", None),
        viz.LabelColumn("tissue", tissue, 4, names=(None, "CSF", "GM", "WM")),
        viz.LabelColumn("clusters", clusters, 16),
    ]
    path = viz.save_label_maps(tmp_path / "f.png", images, columns, mask=tissue > 0, title="t")
    im = np.asarray(Image.open(path))
    assert max(im.shape[:2]) <= 1600 and min(im.shape[:2]) >= 400
    # the neutral background colour is drawn (the masked-out pixels and its legend entry)
    assert ((im[..., :3] == viz.NEUTRAL_RGB).all(-1)).sum() > 100
    with pytest.raises(ValueError, match="mask must have shape"):
        viz.save_label_maps(tmp_path / "g.png", images, columns, mask=tissue[:2] > 0)


def test_mask_grid_of_16_panels_stays_under_1600_px_and_crops_around_the_structure(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((128, 128), bool)
    truth[90:96, 20:30] = True
    panel = viz.MaskPanel(rng.random((128, 128)), truth, truth.copy(), "Dice 1.00 (mean 0.80)")
    rows = [(f"structure {i}", [panel] * 4) for i in range(4)]
    path = viz.save_mask_grid(tmp_path / "p.png", rows, ["LD", "random", "intensity", "position"], title="t", crop=64)
    im = np.asarray(Image.open(path))
    assert max(im.shape[:2]) <= 1600 and im.shape[0] < 2 * im.shape[1]  # not a tall strip (was 587 x 3278)
    ys, xs = viz._crop_window(truth, 64)
    assert ys.stop - ys.start == 64 and xs.start == 0 and ys.start <= 90 and ys.stop >= 96
    with pytest.raises(ValueError, match="panels for 4 column titles"):
        viz.save_mask_grid(tmp_path / "q.png", [("a", [panel])], ["1", "2", "3", "4"])


def test_no_cluster_colour_is_gray():
    pal = viz.cluster_palette(40).astype(int)
    assert (pal.max(1) - pal.min(1) > 30).all()  # every colour saturated: none reads as the neutral gray
    assert len({tuple(c) for c in pal}) == 40
