"""The search shared by every matcher (LD and NCC): peak candidates, a robust affine over all
landmarks, the second pass in the template frame, and the sub-pixel steps."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .pooling import sample_bilinear

DEFAULT_WINDOW = 3.0
DEFAULT_SUBPIXEL = "gauss-newton"

SUBPIXEL_METHODS = ("parabola", "quadratic", "bicubic", "gauss-newton")
MAP_SUBPIXEL_METHODS = SUBPIXEL_METHODS[:3]  # work on a score map alone
SEARCH_MODES = ("consistent", "global")

# least-squares fit of a + b x + c y + d x^2 + e x y + f y^2 on the 3 x 3 neighbourhood
_QY, _QX = np.mgrid[-1:2, -1:2]
_Q_PINV = np.linalg.pinv(
    np.stack([np.ones(9), _QX.ravel(), _QY.ravel(), _QX.ravel() ** 2, (_QX * _QY).ravel(), _QY.ravel() ** 2], 1)
)


def subpixel_peak(score: torch.Tensor | np.ndarray, iy: int, ix: int, method: str = "parabola") -> tuple[float, float]:
    """(x, y) of the peak of a 2-D score map near integer (ix, iy).

    ``"parabola"``: per-axis parabola through the peak and its two neighbours. ``"quadratic"``:
    least-squares 2-D quadratic (with the xy term) on the 3 x 3 neighbourhood, its vertex when
    the fit is a maximum, else the per-axis parabola. ``"bicubic"``: the maximum of the bicubic
    interpolation of the 5 x 5 neighbourhood on a 1/8 px grid (``"quadratic"`` within 2 px of the
    border). Offsets are clamped to [-0.5, 0.5]; at the border the integer coordinate is kept
    along that axis.
    """
    if method not in MAP_SUBPIXEL_METHODS:
        raise ValueError(
            f'method must be one of {MAP_SUBPIXEL_METHODS} ("gauss-newton" needs the descriptors: '
            f"refine_gauss_newton), got {method!r}"
        )
    s = np.asarray(score.detach().cpu() if isinstance(score, torch.Tensor) else score, dtype=np.float64)
    h, w = s.shape
    if method == "bicubic":
        if 2 <= ix < w - 2 and 2 <= iy < h - 2 and np.isfinite(s[iy - 2 : iy + 3, ix - 2 : ix + 3]).all():
            nb = torch.as_tensor(s[iy - 2 : iy + 3, ix - 2 : ix + 3])[None, None]
            up = F.interpolate(nb, size=(33, 33), mode="bicubic", align_corners=True)[0, 0, 12:21, 12:21]
            oy, ox = divmod(int(up.argmax()), 9)
            return ix + (ox - 4) / 8.0, iy + (oy - 4) / 8.0
        method = "quadratic"
    if method == "quadratic" and 0 < ix < w - 1 and 0 < iy < h - 1:
        nb = s[iy - 1 : iy + 2, ix - 1 : ix + 2]
        if np.isfinite(nb).all():
            _, b, c, d, e, f = _Q_PINV @ nb.ravel()
            hess = np.array([[2 * d, e], [e, 2 * f]])
            if 2 * d < 0 and np.linalg.det(hess) > 1e-12:
                ox, oy = np.clip(-np.linalg.solve(hess, [b, c]), -0.5, 0.5)
                return ix + float(ox), iy + float(oy)

    def off(a, b, c):
        den = a - 2 * b + c
        if not np.isfinite(den) or den >= 0:  # not a maximum of a parabola
            return 0.0
        return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))

    dx = off(s[iy, ix - 1], s[iy, ix], s[iy, ix + 1]) if 0 < ix < w - 1 else 0.0
    dy = off(s[iy - 1, ix], s[iy, ix], s[iy + 1, ix]) if 0 < iy < h - 1 else 0.0
    return ix + dx, iy + dy


# ----------------------------------------------------------------------------- search (shared by all methods)


def peak_candidates(maps: torch.Tensor, k: int = 5, nms: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best local maxima (``nms`` x ``nms`` non-maximum suppression) of each score map
    (M, H, W): positions (M, k, 2) as (x, y) and scores (M, k) (-inf where a map has fewer peaks)."""
    m, h, w = maps.shape
    mx = F.max_pool2d(maps[None], nms, 1, nms // 2)[0]
    cand = torch.where(maps == mx, maps, torch.full_like(maps, -math.inf)).flatten(1)
    v, idx = cand.topk(min(k, h * w), dim=1)
    xy = torch.stack([idx % w, idx // w], -1).double().numpy()
    return xy, v.double().numpy()


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares affine B (3, 2) with ``[src, 1] @ B ~ dst`` for points (M, 2), M >= 3."""
    x = np.concatenate([src, np.ones((len(src), 1))], 1)
    if weights is not None:
        sw = np.sqrt(np.asarray(weights, dtype=np.float64))[:, None]
        x, dst = x * sw, dst * sw
    return np.linalg.lstsq(x, dst, rcond=None)[0]


def apply_affine(b: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64) @ b[:2] + b[2]


def _admissible(lin: np.ndarray, max_scale: float = 2.0) -> np.ndarray:
    """Whether linear parts (..., 2, 2) keep orientation (det > 0) and have both singular values
    in [1/max_scale, max_scale]."""
    sv = np.linalg.svd(lin, compute_uv=False)
    return (np.linalg.det(lin) > 0) & (sv[..., 0] <= max_scale) & (sv[..., 1] >= 1.0 / max_scale)


def robust_affine(
    points: np.ndarray,
    cand_xy: np.ndarray,
    cand_score: np.ndarray,
    tol: float = 4.0,
    n_hyp: int = 512,
    max_scale: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One affine map template -> target shared by all landmarks, robust to wrong peaks.

    RANSAC-style: ``n_hyp`` hypotheses from 3 random landmarks with one random candidate peak
    each (a quarter of them use the best peaks only); a hypothesis is scored by the soft inlier
    count sum_m max(0, 1 - (d_m / tol)^2), d_m = distance from landmark m's predicted position to
    its nearest candidate. Hypotheses with a reflection (det < 0) or a singular value outside
    [1/max_scale, max_scale] are rejected (mirror-image assignments are exactly what this removes).
    The best one is refined by least squares on its inliers (3 rounds). Returns (B (3, 2), inlier
    mask (M,)) or None with fewer than 3 landmarks or no admissible hypothesis. Deterministic.
    """
    m, k, _ = cand_xy.shape
    if m < 3:
        return None
    rng = np.random.default_rng(seed)
    tri = np.argsort(rng.random((n_hyp, m)), axis=1)[:, :3]
    ci = rng.integers(0, k, (n_hyp, 3))
    ci[: n_hyp // 4] = 0
    ok_c = np.isfinite(cand_score[tri, ci]).all(1)
    x = np.concatenate([points[tri], np.ones((n_hyp, 3, 1))], 2)  # (n, 3, 3)
    ext = np.ptp(points, axis=0).max() + 1e-9
    area = np.abs(np.linalg.det(x)) / 2
    ok = ok_c & (area > 1e-3 * ext * ext)
    if not ok.any():
        return None
    x, y = x[ok], cand_xy[tri[ok], ci[ok]]
    b = np.linalg.solve(x, y)  # (n, 3, 2)
    ok = _admissible(b[:, :2, :], max_scale)
    if not ok.any():
        return None
    b = b[ok]
    valid = np.isfinite(cand_score)
    pred = np.einsum("mi,nij->nmj", points, b[:, :2]) + b[:, None, 2]  # (n, M, 2)
    d = np.linalg.norm(pred[:, :, None, :] - cand_xy[None], axis=-1)
    d = np.where(valid[None], d, np.inf).min(-1)
    score = np.clip(1 - (d / tol) ** 2, 0, None).sum(1)
    best = b[int(score.argmax())]
    inl = np.zeros(m, dtype=bool)
    for _ in range(3):
        pred = apply_affine(best, points)
        d = np.where(valid, np.linalg.norm(pred[:, None] - cand_xy, axis=-1), np.inf)
        j = d.argmin(1)
        inl = d[np.arange(m), j] < tol
        if inl.sum() < 3:
            break
        best = fit_affine(points[inl], cand_xy[np.arange(m), j][inl])
    return best, inl


def refine_gauss_newton(
    desc: torch.Tensor, protos: torch.Tensor, start: np.ndarray, iters: int = 5, max_offset: float = 1.0
) -> np.ndarray:
    """Feature-metric sub-pixel refinement (M, 2) of integer peaks ``start`` (M, 2) (x, y).

    For every landmark m the offset that minimises ||D(p) - proto_m||^2, where D is the bilinear
    interpolation of the descriptor field ``desc`` (1, C, H, W) and ``protos`` (M, C) the landmark
    descriptors: Gauss-Newton with central-difference Jacobians (1 px), ``iters`` steps, the
    position kept within ``max_offset`` px of its start along each axis. For unit descriptors this
    maximises the cosine, using every descriptor channel instead of nine samples of the score map.
    ``desc`` may instead be a ``FractionalSampler`` (D(p) pooled exactly at p, its own Jacobian).
    """
    p0 = torch.as_tensor(np.asarray(start, dtype=np.float64))
    pr = protos.to(torch.float64)
    if isinstance(desc, torch.Tensor):
        d64 = desc.to(torch.float64)
        ex = torch.tensor([1.0, 0.0], dtype=torch.float64)
        ey = torch.tensor([0.0, 1.0], dtype=torch.float64)

        def value(q):
            return sample_bilinear(d64, q)

        def jacobian(q):
            return torch.stack(
                [
                    (sample_bilinear(d64, q + ex) - sample_bilinear(d64, q - ex)) / 2,
                    (sample_bilinear(d64, q + ey) - sample_bilinear(d64, q - ey)) / 2,
                ],
                -1,
            )
    else:  # a FractionalSampler (or any callable with .jacobian)

        def value(q):
            return desc(q).to(torch.float64)

        jacobian = desc.jacobian
    eye = 1e-9 * torch.eye(2, dtype=torch.float64)
    p = p0.clone()
    for _ in range(int(iters)):
        jac = jacobian(p)  # (M, C, 2)
        res = pr - value(p)
        jt = jac.transpose(1, 2)
        step = torch.linalg.solve(jt @ jac + eye, (jt @ res[..., None])[..., 0])
        p = torch.minimum(torch.maximum(p + step, p0 - max_offset), p0 + max_offset)
    return p.numpy()


def _peak_positions(maps: torch.Tensor, idx: torch.Tensor, subpixel: str, features) -> np.ndarray:
    """Sub-pixel positions (M, 2) of the integer peaks ``idx`` (flat, (M,)) of ``maps`` (M, H, W)."""
    m, h, w = maps.shape
    if subpixel == "gauss-newton":
        if features is None:
            raise ValueError('subpixel="gauss-newton" needs features=(descriptor field, landmark descriptors)')
        start = np.stack([(idx % w).numpy(), (idx // w).numpy()], 1).astype(np.float64)
        return refine_gauss_newton(features[0], features[1], start)
    out = np.zeros((m, 2))
    for i in range(m):
        iy, ix = divmod(int(idx[i]), w)
        out[i] = subpixel_peak(maps[i], iy, ix, subpixel)
    return out


def _refit_affine(points: np.ndarray, found: np.ndarray, inliers: np.ndarray) -> np.ndarray | None:
    """The least-squares affine from the template ``points`` to the ``found`` positions of the
    ``inliers`` (both (M, 2)), or None with fewer than 3 inliers or an inadmissible fit."""
    if inliers.sum() < 3:
        return None
    b = fit_affine(points[inliers], found[inliers])
    return b if _admissible(b[:2]) else None


def search_near(
    maps: torch.Tensor, centres: np.ndarray, window: float, subpixel: str = "quadratic", features=None
) -> np.ndarray:
    """Per map (M, H, W): the sub-pixel arg-max within ``window`` px of its centre (M, 2).
    ``features``: (descriptor field (1, C, H, W), landmark descriptors (M, C)) of those maps,
    needed for ``subpixel="gauss-newton"``."""
    m, h, w = maps.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    c = torch.as_tensor(np.asarray(centres, dtype=np.float64))
    d2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
    # the nearest pixel is always admissible, also for a centre outside the image
    near = d2 <= torch.maximum(d2.flatten(1).min(1).values, torch.full((m,), float(window) ** 2))[:, None, None]
    masked = torch.where(near, maps.double(), torch.full_like(maps, -math.inf, dtype=torch.float64)).flatten(1)
    return _peak_positions(maps, masked.argmax(1), subpixel, features)


def locate_in_maps(
    maps: torch.Tensor,
    points: np.ndarray,
    search: str = "consistent",
    top_k: int = 5,
    tol: float = 4.0,
    window: float = DEFAULT_WINDOW,
    subpixel: str = "quadratic",
    seed: int = 0,
    features=None,
) -> tuple[np.ndarray, dict]:
    """Landmark positions (M, 2) from one similarity map per template landmark (M, H, W).

    ``"global"``: each map's arg-max. ``"consistent"``: candidates = the ``top_k`` local maxima of
    every map, one robust affine (``robust_affine``) from the template points to them, then each
    landmark is the best peak within ``window`` px of its affine prediction (falls back to
    ``"global"`` with fewer than 3 landmarks or no admissible affine). Both end with the same
    sub-pixel step (``features``: see ``search_near``). The same function serves LD and NCC, so
    they differ only in their maps.
    """
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
    info: dict = {"affine": None, "inliers": None}
    if search == "consistent":
        pts = np.asarray(points, dtype=np.float64)
        cxy, csc = peak_candidates(maps, top_k)
        fit = robust_affine(pts, cxy, csc, tol=tol, seed=seed)
        if fit is not None:
            info["affine"], info["inliers"] = fit
            out = search_near(maps, apply_affine(fit[0], pts), window, subpixel, features)
            # the affine again, from the sub-pixel positions of its inliers (the RANSAC fit saw
            # whole-pixel candidates only)
            b = _refit_affine(pts, out, fit[1])
            if b is not None:
                info["affine"] = b
            return out, info
    return _peak_positions(maps, maps.flatten(1).argmax(1), subpixel, features), info


def rectify(image: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The target ``image`` resampled into the template frame (``shape``) through the affine
    template -> target ``b`` (3, 2): out[q] = image[q @ b[:2] + b[2]], bilinear, zeros outside."""
    h, w = shape
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    q = apply_affine(b, np.stack([xs.ravel(), ys.ravel()], 1))
    th, tw = np.asarray(image).shape
    grid = np.stack([(2 * q[:, 0] + 1) / tw - 1, (2 * q[:, 1] + 1) / th - 1], 1).reshape(1, h, w, 2)
    t = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    g = torch.as_tensor(grid, dtype=torch.float32)
    out = F.grid_sample(t, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()


def split_matcher_output(scored) -> tuple[torch.Tensor, tuple | None]:
    """A matcher's answer: maps (M, H, W), or (maps, features) with features = (descriptor field
    (1, C, H, W), landmark descriptors (M, C)) for ``subpixel="gauss-newton"``."""
    if isinstance(scored, torch.Tensor):
        return scored, None
    maps, features = scored
    return maps, features


def locate_image(
    score_fn,
    image: np.ndarray,
    points: np.ndarray,
    template_shape: tuple[int, int],
    rectified: bool = True,
    maps=None,
    passes: int = 1,
    **search,
) -> tuple[np.ndarray, dict]:
    """Landmarks (M, 2) in a target ``image`` for any matcher ``score_fn(image)``, which returns
    the (M, H, W) maps, or (maps, features) for ``subpixel="gauss-newton"`` (see ``search_near``).

    ``locate_in_maps`` on the target's maps; with ``rectified`` and a consistent affine found, a
    second pass resamples the target into the template frame through that affine (``rectify``),
    recomputes the maps there, where rotation, scale and shear are undone, takes each landmark's
    best peak within ``window`` px of its template position and maps it back through the affine.
    ``maps``: the target's ``score_fn`` answer if already computed. ``passes`` > 1: further passes
    in the template frame, each through the affine refitted to the previous pass's inliers.
    """
    points = np.asarray(points, dtype=np.float64)
    maps1, feats1 = split_matcher_output(score_fn(image) if maps is None else maps)
    out, info = locate_in_maps(maps1, points, features=feats1, **search)
    if rectified and info["affine"] is not None:
        b = info["affine"]
        window, subpixel = search.get("window", DEFAULT_WINDOW), search.get("subpixel", "quadratic")
        for k in range(int(passes)):
            if k:
                b = _refit_affine(points, out, info["inliers"])
                if b is None:
                    break
                info["affine"] = b
            maps2, feats2 = split_matcher_output(score_fn(rectify(image, b, template_shape)))
            out = apply_affine(b, search_near(maps2, points, window, subpixel, feats2))
    return out, info
