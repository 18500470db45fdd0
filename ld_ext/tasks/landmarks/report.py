"""What ``ld-ext landmark --targets`` reports: the plausibility flags of each prediction, the table
printed after a run and the figure of every target.

A prediction is flagged (a warning naming the target and the landmark; ``"flags"`` in the JSON):

- **outside the image**: beyond the image's edge (x < -0.5 or x > W - 0.5, likewise y; pixel
  centres at integers). A landmark cannot lie there; the search extrapolated an affine.
- **on the image border**: within ``BORDER_PX`` px of the outermost pixel centres while the
  template's landmark is not. The score maps are pooled over windows that the border truncates, and
  an arg-max stuck to the edge is the typical failure, not a finding.
- **far from the template**: more than ``FAR_FRACTION`` of the image diagonal from where the
  template puts it (the template landmark at the same relative position of the target). The task
  assumes template and targets show the same anatomy framed alike (one-shot annotation transfer);
  pose differences of such sets move a landmark by far less, so a larger move is most likely a
  confusion with a similar-looking structure.

Flags are computed in the frame the search ran in (after ``--size``); they are warnings only, the
prediction is kept.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ...viz import cluster_palette, new_figure
from .. import common

__all__ = ["BORDER_PX", "FAR_FRACTION", "flag_predictions", "predictions_table", "plot_targets"]

BORDER_PX = 1.0
FAR_FRACTION = 0.25


def _near_border(p: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    x, y = p[:, 0], p[:, 1]
    return (x < BORDER_PX) | (x > w - 1 - BORDER_PX) | (y < BORDER_PX) | (y > h - 1 - BORDER_PX)


def flag_predictions(
    p: np.ndarray, shape: tuple[int, int], template_points: np.ndarray, template_shape: tuple[int, int]
) -> list[list[str]]:
    """The reasons (empty list: none) each predicted landmark ``p`` (M, 2) in an image of ``shape``
    (H, W) is implausible, given the template landmarks (M, 2) in a template of ``template_shape``
    (see the module docstring)."""
    p = np.asarray(p, dtype=np.float64)
    tp = np.asarray(template_points, dtype=np.float64)
    h, w = shape
    th, tw = template_shape
    expected = (tp + 0.5) / np.array([tw, th]) * np.array([w, h]) - 0.5
    diag = math.hypot(w, h)
    outside = (p[:, 0] < -0.5) | (p[:, 0] > w - 0.5) | (p[:, 1] < -0.5) | (p[:, 1] > h - 0.5)
    border = _near_border(p, shape) & ~_near_border(tp, template_shape)
    dist = np.hypot(*(p - expected).T)
    flags = []
    for i in range(len(p)):
        why = []
        if outside[i]:
            why.append("outside the image")
        elif border[i]:
            why.append("on the image border")
        if dist[i] > FAR_FRACTION * diag:
            why.append(f"far from where the template puts it ({100 * dist[i] / diag:.0f}% of the image diagonal)")
        flags.append(why)
    return flags


def predictions_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one line per (target, landmark): ``rows`` hold ``file``, ``index``,
    ``name``, ``x``, ``y`` (the target's own pixels), ``score`` and ``flags``."""
    fw = max([len("target")] + [len(r["file"]) for r in rows])
    nw = max([len("landmark")] + [min(len(r["name"]), 24) for r in rows])
    lines = [f"{'target':<{fw}}  {'#':>3}  {'landmark':<{nw}}  {'x':>8}  {'y':>8}  {'score':>6}  flag"]
    last = None
    for r in rows:
        file = r["file"] if r["file"] != last else ""
        last = r["file"]
        flag = "; ".join(r["flags"]) if r["flags"] else ""
        lines.append(
            f"{file:<{fw}}  {r['index']:>3}  {r['name'][:24]:<{nw}}  {r['x']:>8.1f}  {r['y']:>8.1f}  "
            f"{r['score']:>6.3f}  {flag}".rstrip()
        )
    return "\n".join(lines)


def _draw_points(ax, img, p, flags, colours, size_note: str = "") -> None:
    h, w = img.shape
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    shown = np.stack([np.clip(p[:, 0], -0.5, w - 0.5), np.clip(p[:, 1], -0.5, h - 0.5)], 1)
    fs = 7 if len(p) <= 12 else 5.5
    for i, (x, y) in enumerate(shown):
        ax.plot(x, y, "+", color=colours[i], ms=7, mew=1.5)
        ax.annotate(str(i), (x, y), xytext=(3, 2), textcoords="offset points", color=colours[i], fontsize=fs)
        if flags[i]:
            ax.plot(x, y, "o", mfc="none", mec="red", ms=11, mew=1.2)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_targets(
    path, template: np.ndarray, points: np.ndarray, names: Sequence[str], targets: Sequence, template_name: str = ""
) -> None:
    """One panel for the template and one for every target (``targets``: (file name, image in [0, 1]
    as searched, predictions (M, 2) in that image, flags per landmark)), landmarks numbered in
    one colour each, a legend of their names, flagged predictions circled in red."""
    from matplotlib.lines import Line2D

    n = len(targets) + 1
    cols = min(4, n)
    rows = math.ceil(n / cols)
    m = len(names)
    colours = cluster_palette(m).astype(np.float64) / 255.0
    legend_cols = 1 if m <= 16 else 2
    fig = new_figure(figsize=(2.6 * cols + 1.6 * legend_cols, 2.75 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    _draw_points(axes[0], template, points, [[]] * m, colours)
    axes[0].set_title(f"template {template_name} (annotated)".replace("  ", " "), fontsize=8)
    for ax, (name, img, p, flags) in zip(axes[1:], targets):
        _draw_points(ax, img, np.asarray(p), flags, colours)
        bad = sum(1 for f in flags if f)
        ax.set_title(name + (f" ({bad} flagged)" if bad else ""), fontsize=8, color="red" if bad else "black")
    for ax in axes[n:]:
        ax.axis("off")
    handles = [
        Line2D([], [], marker="+", ls="", color=colours[i], ms=7, mew=1.5, label=f"{i}: {names[i][:20]}")
        for i in range(m)
    ]
    if any(any(f) for _, _, _, f in targets):
        handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec="red", ms=9, label="implausible (warned)"))
    fig.legend(handles=handles, loc="center right", fontsize=7, ncol=legend_cols, title="landmarks", title_fontsize=8)
    fig.suptitle(f"ld-ext landmark: predictions on {len(targets)} target(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - (1.6 * legend_cols) / (2.6 * cols + 1.6 * legend_cols), 0.97))
    common.atomic_savefig(fig, path)
