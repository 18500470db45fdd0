"""Evaluation: known warps of a template, radial errors of LD and NCC through one search, paired
bootstrap differences, the per-method settings selected on development data, plots."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ...viz import new_figure
from .. import common
from .locator import LandmarkLocator
from .ncc import ncc_locate
from .pooling import DEFAULT_RADII

# Per-method settings selected on DEVELOPMENT data only (never the evaluation targets): the demo's
# mild and hard settings built on other template slices (z = -4, +20, +32 mm; 17/20/20 Dosenbach
# landmarks; 20 targets each per setting, seeds 100 + z) with the LD network + 1000 steps of the
# centre-sensitive term; criterion: the mean of the mild and hard mean radial errors; one setting at a
# time (window and sub-pixel step, then radii and sigma, then passes). Every method got the same
# menu: window 2 or 3 px; sub-pixel quadratic, bicubic or gauss-newton; 1, 2 or 3 passes in the
# template frame; LD radii (1,3,6,12), (1,3,6,12,24), (1,2,4,8), (1,2,4,8,16), (2,4,8,16), (2,4,8),
# (1,2,4), (1,2,3,4,6,8), (0,1,2,4,8), (0,1,2,4), (0,1,2,3,4,6,8); Gaussian sigma_frac 0.35, 0.5
# or 0.7 (figures in docs/tasks.md).
# Then (same data and criterion) exact fractional-centre pooling (``fractional="exact"``, for the
# landmark descriptors and D(p) in the Gauss-Newton step) with hard or soft (anti-aliased) disc
# edges, for both poolings; then the Jacobian step 0.25, 0.5 or 1 px; then sigma_frac 0.35, 0.5,
# 0.7 or 1.0; then radii (0,1,2,4,8) or (1,2,4,8).
SELECTED_LD = {
    "centre-sensitive": dict(
        radii=(0, 1, 2, 4, 8),
        mode="gaussian",
        sigma_frac=1.0,
        window=3.0,
        subpixel="gauss-newton",
        fractional="exact",
        edge="soft",
        jac_step=0.5,
    ),
    "uniform pooling": dict(
        radii=(0, 1, 2, 4, 8),
        mode="uniform",
        window=3.0,
        subpixel="gauss-newton",
        fractional="exact",
        edge="soft",
        jac_step=0.25,
    ),
}
SELECTED_NCC = {  # half-size: search settings
    4: dict(window=2.0, subpixel="gauss-newton", passes=3),
    8: dict(window=3.0, subpixel="gauss-newton", passes=3),
    12: dict(window=3.0, subpixel="gauss-newton", passes=3),
}


# ----------------------------------------------------------------------------- evaluation


def radial_errors_table(errors: dict[str, np.ndarray], radii=(2, 4, 8)) -> list[dict]:
    rows = []
    for name, err in errors.items():
        e = np.asarray(err).ravel()
        row = {"method": name, "mre_px": float(e.mean()), "sd_px": float(e.std()), "median_px": float(np.median(e))}
        for r in radii:
            row[f"sr@{r}px"] = float((e <= r).mean())
        rows.append(row)
    return rows


def table_markdown(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def make_eval_targets(
    template: np.ndarray,
    points: np.ndarray,
    n: int,
    seed: int = 0,
    sources: Sequence[np.ndarray] | None = None,
    bias: float = 0.0,
    **warp_kw,
):
    """``n`` warped images (random affine + elastic, gamma 0.8..1.25, noise sd 0.02, optional
    smooth multiplicative bias field of amplitude ``bias``) with the exact positions of ``points``.

    Each target warps the template, or, with ``sources``, one of those images drawn at random
    (e.g. neighbouring slices of the same volume, on which the landmarks have the same in-plane
    coordinates). ``warp_kw`` go to ``common.random_warp``.
    """
    rng = np.random.default_rng(seed)
    h, w = template.shape
    targets, gts = [], []
    for _ in range(n):
        src = template if not sources else sources[int(rng.integers(len(sources)))]
        wp = common.random_warp((h, w), rng, **warp_kw)
        img = common.warp_image(src, wp)
        img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
        if bias > 0:
            img = img * (1.0 + bias * common.smooth_noise(rng, (h, w), max(h, w) / 4))
        img = img + rng.normal(0, 0.02, img.shape)
        targets.append(np.clip(img, 0, 1).astype(np.float32))
        gts.append(wp.forward_points(points))
    return targets, gts


def evaluate_methods(
    model,
    template: np.ndarray,
    points: np.ndarray,
    targets: list[np.ndarray],
    gts: list[np.ndarray],
    radii: Sequence[int] = DEFAULT_RADII,
    ncc_halves: Sequence[int] = (4, 8, 12),
    search: dict | None = None,
    progress: bool = True,
    ld_methods: dict | None = None,
    ncc_methods: dict | None = None,
) -> dict:
    """Radial errors (px) of LD centre-sensitive, LD uniform and NCC (one entry per patch size).

    ``model`` is one LD network, or a dict ``{label: network}`` (e.g. with and without the
    centre-sensitive training term); each network gives a centre-sensitive and a uniform row.
    Every method goes through the same search (``locate_image``; ``search``: its keywords and
    ``rectified``), so they differ only in their similarity maps. ``ld_methods`` ({row suffix:
    ``LandmarkLocator`` keywords}) and ``ncc_methods`` ({half: search keywords}) replace the
    defaults (``radii``/``search`` with gaussian and uniform pooling; ``ncc_halves``/``search``),
    e.g. with per-method settings selected on development data (``SELECTED``). Points that the
    warp moves outside the image are left out. Returns the table rows, the pooled errors per
    method and ``target`` (the target index of every error, for paired comparisons).
    """
    from tqdm import tqdm

    search = dict(search or {})
    if ld_methods is None:
        ld_methods = {
            "centre-sensitive": dict(radii=radii, mode="gaussian", **search),
            "uniform pooling": dict(radii=radii, mode="uniform", **search),
        }
    if ncc_methods is None:
        ncc_methods = {hh: search for hh in ncc_halves}
    models = model if isinstance(model, dict) else {"LD": model}
    locs = {}
    for label, net in models.items():
        t_emb, _ = common.embed(net, template[None])
        t_emb = t_emb.double()
        for suffix, kw in ld_methods.items():
            locs[f"{label} {suffix}"] = (net, LandmarkLocator(**kw).fit(t_emb, points))
    errors: dict[str, list] = {k: [] for k in locs}
    for hh in ncc_methods:
        errors[f"NCC {2 * hh + 1}x{2 * hh + 1}"] = []
    timing: dict[str, float] = {k: 0.0 for k in errors}
    h, w = template.shape
    tid = []
    for ti, (tgt, gt) in enumerate(tqdm(list(zip(targets, gts)), desc="landmark eval", disable=not progress)):
        valid = (gt[:, 0] >= 0) & (gt[:, 0] <= w - 1) & (gt[:, 1] >= 0) & (gt[:, 1] <= h - 1)
        tid.append(np.full(int(valid.sum()), ti))
        cache = {}
        for name, (net, loc) in locs.items():
            t0 = time.perf_counter()
            if id(net) not in cache:
                cache[id(net)] = common.embed(net, tgt[None])[0].double()
            pred = loc.locate_image(net, tgt, cache[id(net)])
            timing[name] += time.perf_counter() - t0
            errors[name].append(np.linalg.norm(pred - gt, axis=1)[valid])
        for hh, kw in ncc_methods.items():
            t0 = time.perf_counter()
            pred = ncc_locate(template, points, tgt, hh, **kw)
            timing[f"NCC {2 * hh + 1}x{2 * hh + 1}"] += time.perf_counter() - t0
            errors[f"NCC {2 * hh + 1}x{2 * hh + 1}"].append(np.linalg.norm(pred - gt, axis=1)[valid])
    errs = {k: np.concatenate(v) for k, v in errors.items()}
    rows = radial_errors_table(errs)
    for r in rows:
        r["sec_per_image"] = timing[r["method"]] / max(len(targets), 1)
    return {"rows": rows, "errors": errs, "target": np.concatenate(tid) if tid else np.zeros(0, dtype=int)}


def paired_difference(
    err_a: np.ndarray, err_b: np.ndarray, target: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Mean radial error difference a - b over the same landmarks and targets, with a 95 %
    bootstrap interval that resamples whole targets (errors within a target are correlated),
    and the fraction of targets on which a has the lower mean error."""
    a, b, t = np.asarray(err_a, float), np.asarray(err_b, float), np.asarray(target)
    if not (a.shape == b.shape == t.shape) or a.size == 0:
        raise ValueError("err_a, err_b and target must be non-empty and of one shape")
    ids = np.unique(t)
    da = np.array([a[t == i].mean() - b[t == i].mean() for i in ids])
    cnt = np.array([(t == i).sum() for i in ids], dtype=float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), (n_boot, len(ids)))
    boot = (da[pick] * cnt[pick]).sum(1) / cnt[pick].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "mean_diff_px": float((a - b).mean()),
        "ci95_px": [float(lo), float(hi)],
        "targets_a_better": float((da < 0).mean()),
        "n_targets": int(len(ids)),
    }


def plot_landmarks(path, template, points, target, gt, preds: dict, title: str = "") -> None:
    fig = new_figure(figsize=(9, 4.8))
    ax = fig.subplots(1, 2)
    ax[0].imshow(template, cmap="gray")
    ax[0].plot(points[:, 0], points[:, 1], "y+", ms=8, mew=1.5)
    ax[0].set_title("template + landmarks")
    ax[1].imshow(target, cmap="gray")
    if gt is not None:
        ax[1].plot(gt[:, 0], gt[:, 1], "o", mfc="none", mec="lime", ms=7, label="ground truth")
    markers = ["r+", "cx", "m1", "b2"]
    for (name, p), mk in zip(preds.items(), markers):
        ax[1].plot(p[:, 0], p[:, 1], mk, ms=7, mew=1.3, label=name)
    ax[1].legend(loc="lower center", fontsize=7, framealpha=0.7, bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax[1].set_title(title or "target")
    for a in ax:
        a.axis("off")
    common.atomic_savefig(fig, path)
