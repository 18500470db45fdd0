"""Pictures people look at: cluster overlays, embedding maps and loss curves (PNG, written atomically)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .atomic import atomic_write_bytes

__all__ = ["cluster_palette", "overlay_clusters", "embedding_rgb", "save_grid", "save_loss_curves", "new_figure"]


def new_figure(**kwargs):
    """A matplotlib ``Figure`` that pyplot does not manage: drawing and saving it never selects a
    backend or touches the figures of a notebook or GUI session (never calls matplotlib's use())."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def cluster_palette(k: int) -> np.ndarray:
    """(k, 3) uint8 distinct colours (tab20 then evenly spaced hues)."""
    base = np.array(
        [
            [31, 119, 180],
            [255, 127, 14],
            [44, 160, 44],
            [214, 39, 40],
            [148, 103, 189],
            [140, 86, 75],
            [227, 119, 194],
            [127, 127, 127],
            [188, 189, 34],
            [23, 190, 207],
            [174, 199, 232],
            [255, 187, 120],
            [152, 223, 138],
            [255, 152, 150],
            [197, 176, 213],
            [196, 156, 148],
            [247, 182, 210],
            [199, 199, 199],
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


def overlay_clusters(img: torch.Tensor, labels: torch.Tensor, k: int, alpha: float = 0.45) -> np.ndarray:
    """Blend a colour per cluster label (H, W) over the image (C, H, W) in [0, 1] -> (H, W, 3) uint8."""
    base = _gray_rgb(img).astype(np.float32)
    col = cluster_palette(k)[labels.detach().cpu().numpy().astype(np.int64)].astype(np.float32)
    return ((1 - alpha) * base + alpha * col).round().clip(0, 255).astype(np.uint8)


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
