"""Pictures people look at: cluster overlays, embedding maps and loss curves (PNG, written atomically)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .atomic import atomic_savefig, atomic_write_bytes

__all__ = [
    "cluster_palette",
    "overlay_clusters",
    "embedding_rgb",
    "save_grid",
    "save_loss_curves",
    "new_figure",
    "LabelColumn",
    "save_label_maps",
    "MaskPanel",
    "save_mask_grid",
]

# Outside the region of interest label maps are drawn in this one neutral colour (not a label colour).
NEUTRAL_RGB = (64, 64, 64)


def new_figure(**kwargs):
    """A matplotlib ``Figure`` that pyplot does not manage: drawing and saving it never selects a
    backend or touches the figures of a notebook or GUI session (never calls matplotlib's use())."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def cluster_palette(k: int) -> np.ndarray:
    """(k, 3) uint8 distinct colours (tab20 with its two grays replaced, then evenly spaced hues); no
    colour is gray, so a label is never mistaken for the neutral gray of masked-out pixels."""
    base = np.array(
        [
            [31, 119, 180],
            [255, 127, 14],
            [44, 160, 44],
            [214, 39, 40],
            [148, 103, 189],
            [140, 86, 75],
            [227, 119, 194],
            [0, 60, 130],  # tab20's gray replaced: gray reads as "not coloured" (NEUTRAL_RGB)
            [188, 189, 34],
            [23, 190, 207],
            [174, 199, 232],
            [255, 187, 120],
            [152, 223, 138],
            [255, 152, 150],
            [197, 176, 213],
            [196, 156, 148],
            [247, 182, 210],
            [255, 215, 0],  # tab20's light gray replaced, as above
            [219, 219, 141],
            [158, 218, 229],
        ],
        dtype=np.uint8,
    )
    if k <= len(base):
        return base[:k]
    import colorsys

    extra = [colorsys.hsv_to_rgb(i / (k - len(base)), 0.8, 0.9) for i in range(k - len(base))]
    return np.concatenate([base, (np.array(extra) * 255).astype(np.uint8)])


def _gray_rgb(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8."""
    x = img.detach().float().cpu().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay_clusters(
    img: torch.Tensor, labels: torch.Tensor, k: int, alpha: float = 0.45, mask: torch.Tensor | None = None
) -> np.ndarray:
    """Blend a colour per cluster label (H, W) over the image (C, H, W) in [0, 1] -> (H, W, 3) uint8.

    ``mask`` (H, W) bool: only the pixels inside it are coloured; the others are drawn in one neutral
    gray (``NEUTRAL_RGB``), so that labels of the background (e.g. rings of clusters around a brain)
    do not distract from the region that matters."""
    base = _gray_rgb(img).astype(np.float32)
    col = cluster_palette(k)[labels.detach().cpu().numpy().astype(np.int64)].astype(np.float32)
    out = ((1 - alpha) * base + alpha * col).round().clip(0, 255).astype(np.uint8)
    if mask is not None:
        m = mask.detach().cpu().numpy().astype(bool)
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask must have shape {out.shape[:2]}, got {m.shape}")
        out[~m] = NEUTRAL_RGB
    return out


def embedding_rgb(e: torch.Tensor) -> np.ndarray:
    """First three principal components of an embedding map (D, H, W) as (H, W, 3) uint8."""
    d = e.shape[0]
    x = e.detach().float().cpu().reshape(d, -1).t()
    x = x - x.mean(0, keepdim=True)
    try:
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        p = x @ v[: min(3, v.shape[0])].t()
    except RuntimeError:  # degenerate map
        p = x[:, :3]
    if p.shape[1] < 3:
        p = torch.cat([p, torch.zeros(p.shape[0], 3 - p.shape[1])], 1)
    lo, hi = p.min(0).values, p.max(0).values
    p = (p - lo) / (hi - lo).clamp_min(1e-8)
    return (p.reshape(e.shape[1], e.shape[2], 3).numpy() * 255).round().astype(np.uint8)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, pad: int = 2, titles: Sequence[str] | None = None
) -> Path:
    """Tile (H, W, 3) uint8 images (rows x columns, same size) into one PNG, written atomically.

    ``titles``: one text per column, drawn above it.
    """
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("save_grid needs at least one image")
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    if titles is not None and len(titles) != ncol:
        raise ValueError(f"titles: one per column ({ncol}), got {len(titles)}")
    font = _font(max(10, min(16, w // 9))) if titles is not None else None
    top = 0
    if titles is not None:
        width = max(w, max(_text_size(font, t)[0] for t in titles) + 4)
        if width > w:  # text wider than the images: scale the images up so every title fits
            scale = -(-width // w)
            rows = [[np.repeat(np.repeat(im, scale, 0), scale, 1) for im in r] for r in rows]
            h, w = h * scale, w * scale
        top = _text_size(font, "Ag")[1] + 2 * pad + 2
    canvas = np.full((top + len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = top + pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = im
    img = Image.fromarray(canvas)
    if titles is not None:
        draw = ImageDraw.Draw(img)
        for j, t in enumerate(titles):
            tw = _text_size(font, t)[0]
            draw.text((pad + j * (w + pad) + (w - tw) // 2, pad), t, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def save_loss_curves(
    records: Sequence[dict], path: str | os.PathLike, keys: Sequence[str] = ("loss", "pd", "mix", "rd", "ent")
) -> Path:
    """Plot per-epoch losses from metrics records (one line per key present) to a PNG."""
    fig = new_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    xs = list(range(1, len(records) + 1))
    for key in keys:
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            ax.plot(
                [x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], marker=".", label=key
            )
    for i in range(1, len(records)):
        if records[i].get("stage") != records[i - 1].get("stage"):
            ax.axvline(i + 0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("epoch (both stages)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- figures with legends


@dataclass(frozen=True)
class LabelColumn:
    """One column of ``save_label_maps``: a title, the label maps (N, H, W) of its rows and the
    number of labels; ``names`` gives each label a legend entry (``None``: none, e.g. for a label
    that the mask hides), otherwise a numbered colour bar
    stands for them (``None`` labels: the column shows the images alone)."""

    title: str
    labels: torch.Tensor | None
    k: int = 1
    names: Sequence[str] | None = None


def save_label_maps(
    path: str | os.PathLike,
    images: torch.Tensor,
    columns: Sequence[LabelColumn],
    mask: torch.Tensor | None = None,
    title: str = "",
    row_titles: Sequence[str] | None = None,
    alpha: float = 0.7,
    note: str = "",
    mask_label: str = "outside the mask (not coloured)",
) -> Path:
    """A grid of label maps over images (N rows, one column per ``LabelColumn``), each column
    titled, with a legend for named labels and one numbered colour bar for the columns of unnamed
    labels (clusters). ``mask`` (N, H, W) bool: outside it one neutral gray, not a label colour
    (the legend names it ``mask_label``). Written atomically as PNG, at most about 1600 px on its long side."""
    n, ncol = images.shape[0], len(columns)
    if mask is not None and tuple(mask.shape) != (n,) + tuple(images.shape[-2:]):
        raise ValueError(f"mask must have shape {(n,) + tuple(images.shape[-2:])}, got {tuple(mask.shape)}")
    if row_titles is not None and len(row_titles) != n:
        raise ValueError(f"row_titles: one per row ({n}), got {len(row_titles)}")
    panel = min(2.4, 15.0 / max(ncol, n + 1))
    height = panel * n + 1.6
    fig = new_figure(figsize=(panel * ncol, height))
    grid = fig.add_gridspec(
        n + 1,
        ncol,
        height_ratios=[1.0] * n + [0.45],
        hspace=0.08,
        wspace=0.04,
        top=1 - (0.75 if title else 0.35) / height,
        bottom=0.25 / height,
        left=0.04,
        right=0.99,
    )
    for j, col in enumerate(columns):
        for i in range(n):
            ax = fig.add_subplot(grid[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if col.labels is None:
                rgb = overlay_clusters(images[i], torch.zeros(images.shape[-2:], dtype=torch.long), 1, alpha=0.0)
            else:
                m = mask[i] if mask is not None else None
                rgb = overlay_clusters(images[i], col.labels[i], col.k, alpha=alpha, mask=m)
            ax.imshow(rgb, interpolation="nearest")
            if i == 0:
                ax.set_title(col.title, fontsize=10)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=9)
    _label_legends(fig, grid, n, columns, mask_label if mask is not None else None)
    if title:
        fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8)
    return atomic_savefig(fig, path, dpi=_dpi_for(fig, 1600))


def _label_legends(fig, grid, row: int, columns: Sequence[LabelColumn], mask_label: str | None) -> None:
    """Below the grid of ``save_label_maps``: the legend of the first named column (and of the masked-out
    colour) on the left, one numbered colour bar for the columns of unnamed labels on the right."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    n, ncol = row, len(columns)
    named = [c for c in columns if c.labels is not None and c.names is not None]
    handles = [
        Patch(color=cluster_palette(c.k)[q] / 255, label=nm)
        for c in named[:1]
        for q, nm in enumerate(c.names)
        if nm is not None
    ]
    if mask_label is not None:
        handles.append(Patch(color=np.array(NEUTRAL_RGB) / 255, label=mask_label))
    if handles:
        lax = fig.add_subplot(grid[n, : max(1, ncol // 2)])
        lax.axis("off")
        lax.legend(handles=handles, loc="center", ncol=2, fontsize=8, frameon=False)
    numbered = [c for c in columns if c.labels is not None and c.names is None]
    if numbered:
        k = max(c.k for c in numbered)
        cax = fig.add_subplot(grid[n, max(1, ncol // 2) :])
        pos = cax.get_position()
        cax.set_position([pos.x0 + 0.05 * pos.width, pos.y0 + 0.55 * pos.height, 0.9 * pos.width, 0.25 * pos.height])
        cmap = ListedColormap(cluster_palette(k) / 255)
        bar = fig.colorbar(
            ScalarMappable(norm=BoundaryNorm(np.arange(k + 1) - 0.5, k), cmap=cmap),
            cax=cax,
            orientation="horizontal",
            ticks=range(k),
        )
        bar.ax.tick_params(labelsize=7)
        bar.set_label("cluster number (the numbering of each method is arbitrary)", fontsize=8)


@dataclass(frozen=True)
class MaskPanel:
    """One panel of ``save_mask_grid``: an image (H, W) in [0, 1], its ground truth and a predicted mask
    (bool (H, W)), and a short caption under the column's title."""

    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    caption: str = ""


def save_mask_grid(
    path: str | os.PathLike,
    rows: Sequence[tuple[str, Sequence[MaskPanel]]],
    column_titles: Sequence[str],
    title: str = "",
    crop: int | None = None,
) -> Path:
    """Rows of (row title, panels), one column per title: ground truth as a green contour and the
    prediction in red over each image, the caption as the panel's title. ``crop``: show a
    ``crop`` x ``crop`` window centred on the ground truth of the row's first panel (small
    structures are then readable). Written atomically as PNG, at most about 1600 px on its long side."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("save_mask_grid needs at least one row")
    ncol = len(column_titles)
    for name, panels in rows:
        if len(panels) != ncol:
            raise ValueError(f"row {name!r}: {len(panels)} panels for {ncol} column titles")
    nrow = len(rows)
    panel = min(2.6, 15.0 / max(ncol, nrow))
    fig = new_figure(figsize=(panel * ncol, panel * nrow * 1.12 + 1.0))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for i, (name, panels) in enumerate(rows):
        window = _crop_window(panels[0].truth, crop)
        for j, p in enumerate(panels):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            img, truth, pred = (np.asarray(a)[window] for a in (p.image, p.truth, p.prediction))
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            over = np.zeros(pred.shape + (4,))
            over[pred.astype(bool)] = (1.0, 0.15, 0.15, 0.5)
            ax.imshow(over, interpolation="nearest")
            if truth.any():
                ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
            head = f"{column_titles[j]}\n" if i == 0 else ""
            ax.set_title(head + p.caption, fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    handles = [
        Line2D([], [], color="lime", lw=1.5, label="ground truth"),
        Patch(color=(1.0, 0.15, 0.15, 0.5), label="probe prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.6 / fig.get_figheight(), top=1 - 0.75 / fig.get_figheight())
    return atomic_savefig(fig, path, dpi=_dpi_for(fig, 1600))


def _crop_window(truth: np.ndarray, crop: int | None):
    """Slices of a ``crop``-pixel square window centred on the mask (clipped to the image)."""
    h, w = np.asarray(truth).shape
    if crop is None or crop >= min(h, w):
        return (slice(None), slice(None))
    ys, xs = np.nonzero(truth)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (h // 2, w // 2)
    y0 = min(max(0, cy - crop // 2), h - crop)
    x0 = min(max(0, cx - crop // 2), w - crop)
    return (slice(y0, y0 + crop), slice(x0, x0 + crop))


def _dpi_for(fig, long_side_px: int, dpi: int = 100) -> int:
    """The dpi (at most ``dpi``) at which the figure's long side is at most ``long_side_px`` pixels."""
    return max(50, min(dpi, int(long_side_px / max(fig.get_figwidth(), fig.get_figheight()))))
