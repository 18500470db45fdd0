"""Centre-sensitive one-shot landmark localisation (LD_METHOD.md section 8, our concretisation).

From ONE annotated template image each landmark is described by the template's unit pixel
embeddings pooled around it at several radii. Centre-sensitive pooling weights pixels with a
Gaussian (sigma = radius / 2, truncated at the radius), so the descriptor changes quickly when
the window moves off the centre; the ablation pools uniformly over the same discs. Pooled maps
are L2-normalised per radius, concatenated and divided by sqrt(#radii) (unit vectors), so one
inner product is the mean cosine over radii.

Search, per landmark and target image:
1. coarse: the similarity of the large-radius part of the descriptor on a stride-``f`` lattice;
   the best ``top_k`` lattice peaks (3x3 non-maximum suppression) are candidates;
2. fine: the full descriptor's similarity at every pixel of a ``(2w+1)^2`` window around each
   candidate; the best pixel over all windows wins;
3. sub-pixel: a 1-D parabola through the peak and its two neighbours, per axis.

Every similarity map goes through the fused ``ld_ext.pixel_cluster_similarity`` op: the
prototypes are the landmark descriptors plus one all-zero prototype at temperature 1, so
``log S_k - log S_zero = <proto_k, x_p>`` is the cosine map exactly (softmax over K cancels).

The baseline is normalised cross-correlation (NCC) of intensity patches around each template
landmark, searched exhaustively with the same sub-pixel step.

CLI (``ld-ext landmark``): predict ``--targets DIR`` from ``--template IMG --points POINTS.json``,
or ``--evaluate N``: warp the template with N random known affine + elastic deformations and
report mean radial error and success rates for LD centre-sensitive, LD uniform and NCC.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import common

__all__ = [
    "DEFAULT_RADII",
    "pooling_kernel",
    "pooled_descriptors",
    "sample_descriptors",
    "cosine_maps",
    "subpixel_peak",
    "LandmarkLocator",
    "ncc_map",
    "ncc_locate",
    "load_points",
    "evaluate_methods",
    "radial_errors_table",
    "add_arguments",
    "run",
]

DEFAULT_RADII = (1, 3, 6, 12)
POOLING_MODES = ("gaussian", "uniform")


# ----------------------------------------------------------------------------- pooling


def pooling_kernel(radius: int, mode: str = "gaussian", dtype=torch.float32) -> torch.Tensor:
    """(2r+1, 2r+1) weights summing to 1 on the disc of radius r: Gaussian (sigma = r/2) or uniform."""
    if mode not in POOLING_MODES:
        raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    r = int(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1, dtype=dtype), torch.arange(-r, r + 1, dtype=dtype), indexing="ij")
    d2 = xx**2 + yy**2
    inside = d2 <= r * r + 1e-9
    if mode == "gaussian" and r > 0:
        sigma = r / 2.0
        w = torch.exp(-d2 / (2 * sigma * sigma)) * inside
    else:
        w = inside.to(dtype)
    return w / w.sum()


def pooled_descriptors(
    e: torch.Tensor, radii: Sequence[int] = DEFAULT_RADII, mode: str = "gaussian"
) -> torch.Tensor:
    """Pooled descriptor maps (N, R*D, H, W) of unit embeddings e (N, D, H, W).

    Each radius: depthwise convolution with ``pooling_kernel`` (weights renormalised over the
    part of the disc inside the image), per-pixel L2 normalisation; concatenated over radii and
    divided by sqrt(R), so every pixel's descriptor is a unit vector.
    """
    if e.dim() != 4:
        raise ValueError(f"e must have shape (N, D, H, W), got {tuple(e.shape)}")
    if len(radii) == 0:
        raise ValueError("radii must not be empty")
    n, d, h, w = e.shape
    parts = []
    ones = torch.ones(1, 1, h, w, dtype=e.dtype)
    for r in radii:
        k = pooling_kernel(r, mode, dtype=e.dtype)
        pooled = _same_conv_fft(e, k) / _same_conv_fft(ones, k).clamp_min(1e-12)
        parts.append(pooled / (pooled.norm(dim=1, keepdim=True) + 1e-10))
    return torch.cat(parts, dim=1) / math.sqrt(len(radii))


def _same_conv_fft(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Zero-padded 'same' convolution of every channel of x (N, C, H, W) with a centred odd
    kernel k (kh, kw), by FFT (depthwise conv2d with large kernels is slow on CPU)."""
    h, w = x.shape[-2:]
    kh, kw = k.shape
    fh, fw = h + kh - 1, w + kw - 1
    y = torch.fft.irfft2(torch.fft.rfft2(x, s=(fh, fw)) * torch.fft.rfft2(k, s=(fh, fw)), s=(fh, fw))
    return y[..., kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]


def sample_descriptors(desc: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """Bilinear samples (M, C) of one descriptor map (1, C, H, W) at points (M, 2) (x, y),
    renormalised per radius block is not needed for cosine ranking; returned as unit vectors."""
    _, _, h, w = desc.shape
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64), dtype=desc.dtype)
    gx = (2 * pts[:, 0] + 1) / w - 1
    gy = (2 * pts[:, 1] + 1) / h - 1
    grid = torch.stack([gx, gy], 1)[None, :, None, :]
    v = F.grid_sample(desc, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0].t()
    return v / (v.norm(dim=1, keepdim=True) + 1e-10)


def cosine_maps(desc: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """<proto_k, desc_p> for shared prototypes (K, C) or per-image prototypes (N, K, C), through
    the fused softmax-over-prototypes op: with an extra all-zero prototype at temperature 1,
    log S_k - log S_zero is exactly the inner product."""
    from .. import ops

    if protos.dim() == 2:
        zero = torch.zeros(1, protos.shape[1], dtype=protos.dtype)
        p = torch.cat([protos, zero], 0)
    else:
        zero = torch.zeros(protos.shape[0], 1, protos.shape[2], dtype=protos.dtype)
        p = torch.cat([protos, zero], 1)
    s = ops.pixel_cluster_similarity(desc.contiguous(), p.contiguous(), temperature=1.0, normalize=False)
    k = p.shape[-2] - 1
    return torch.log(s[:, :k]) - torch.log(s[:, k : k + 1])


def subpixel_peak(score: torch.Tensor | np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    """(x, y) of the peak of a 2-D score map near integer (ix, iy): per-axis parabola through the
    peak and its neighbours, offset clamped to [-0.5, 0.5]; at the border the integer is kept."""
    s = np.asarray(score.detach().cpu() if isinstance(score, torch.Tensor) else score, dtype=np.float64)
    h, w = s.shape

    def off(a, b, c):
        den = a - 2 * b + c
        if den >= 0:  # not a maximum of a parabola
            return 0.0
        return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))

    dx = off(s[iy, ix - 1], s[iy, ix], s[iy, ix + 1]) if 0 < ix < w - 1 else 0.0
    dy = off(s[iy - 1, ix], s[iy, ix], s[iy + 1, ix]) if 0 < iy < h - 1 else 0.0
    return ix + dx, iy + dy


# ----------------------------------------------------------------------------- LD locator


class LandmarkLocator:
    """One-shot landmark search with pooled LD embeddings (see the module docstring).

    Args:
        radii: pooling radii in pixels.
        mode: "gaussian" (centre-sensitive) or "uniform" (ablation).
        stride: coarse lattice stride f.
        coarse_min_radius: radii >= this form the coarse descriptor (default: stride).
        top_k: coarse candidates refined per landmark.
        window: half-size w of the fine search window (default: stride + 1).
    """

    def __init__(
        self,
        radii: Sequence[int] = DEFAULT_RADII,
        mode: str = "gaussian",
        stride: int = 4,
        coarse_min_radius: int | None = None,
        top_k: int = 3,
        window: int | None = None,
    ) -> None:
        if mode not in POOLING_MODES:
            raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
        self.radii = tuple(int(r) for r in radii)
        if not self.radii or min(self.radii) < 0:
            raise ValueError(f"radii must be non-negative ints, got {radii!r}")
        self.mode = mode
        self.stride = common.check_positive_int("stride", stride)
        cmin = self.stride if coarse_min_radius is None else coarse_min_radius
        self.coarse_idx = [i for i, r in enumerate(self.radii) if r >= cmin] or [len(self.radii) - 1]
        self.top_k = common.check_positive_int("top_k", top_k)
        self.window = self.stride + 1 if window is None else common.check_positive_int("window", window)
        self.protos: torch.Tensor | None = None

    def _split(self, desc: torch.Tensor, idx: list[int]) -> torch.Tensor:
        d = desc.shape[1] // len(self.radii)
        parts = [desc[:, i * d : (i + 1) * d] for i in idx]
        return torch.cat(parts, 1) * math.sqrt(len(self.radii) / len(idx))

    def fit(self, template_emb: torch.Tensor, points: np.ndarray) -> "LandmarkLocator":
        """Describe the landmarks ``points`` (M, 2) of the template's unit embeddings (1, D, H, W)."""
        desc = pooled_descriptors(template_emb, self.radii, self.mode)
        self.protos = sample_descriptors(desc, points)  # (M, R*D)
        return self

    @torch.no_grad()
    def locate(self, target_emb: torch.Tensor, return_maps: bool = False):
        """Landmark positions (M, 2) in one target's unit embeddings (1, D, H, W)."""
        if self.protos is None:
            raise RuntimeError("call fit() first")
        desc = pooled_descriptors(target_emb, self.radii, self.mode)  # (1, C, H, W)
        _, c, h, w = desc.shape
        m = self.protos.shape[0]
        # 1. coarse
        f = self.stride
        cdesc = self._split(desc, self.coarse_idx)[:, :, f // 2 :: f, f // 2 :: f].contiguous()
        cprot = self._split(self.protos[:, :, None, None], self.coarse_idx)[:, :, 0, 0]
        cprot = cprot / (cprot.norm(dim=1, keepdim=True) + 1e-10)
        cmap = cosine_maps(cdesc, cprot)[0]  # (M, h', w')
        nms = cmap == F.max_pool2d(cmap[None], 3, 1, 1)[0]
        cand = torch.where(nms, cmap, torch.full_like(cmap, -math.inf)).flatten(1)
        k = min(self.top_k, cand.shape[1])
        top = cand.topk(k, dim=1).indices  # (M, k)
        cw = cmap.shape[-1]
        # 2. fine windows (all windows of all landmarks as one batch, per-image prototypes)
        win = self.window
        size = 2 * win + 1
        padded = F.pad(desc, (win, win, win, win))
        crops, protos, origins = [], [], []
        for li in range(m):
            for j in range(k):
                idx = int(top[li, j])
                cy = (idx // cw) * f + f // 2
                cx = (idx % cw) * f + f // 2
                cy, cx = min(cy, h - 1), min(cx, w - 1)
                crops.append(padded[0, :, cy : cy + size, cx : cx + size])
                protos.append(self.protos[li])
                origins.append((li, cy - win, cx - win))
        crops_t = torch.stack(crops)  # (M*k, C, size, size)
        prot_t = torch.stack(protos)[:, None, :]  # (M*k, 1, C)
        fine = cosine_maps(crops_t, prot_t)[:, 0]  # (M*k, size, size)
        # mask the padding outside the image
        out = np.zeros((m, 2))
        best = np.full(m, -np.inf)
        for i, (li, oy, ox) in enumerate(origins):
            sc = fine[i].clone()
            ys = torch.arange(size) + oy
            xs = torch.arange(size) + ox
            valid = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
            sc[~valid] = -math.inf
            v, flat = sc.flatten().max(0)
            if float(v) > best[li]:
                best[li] = float(v)
                iy, ix = divmod(int(flat), size)
                sx, sy = subpixel_peak(torch.where(valid, sc, fine[i]), iy, ix)
                out[li] = (ox + sx, oy + sy)
        if return_maps:
            return out, cosine_maps(desc, self.protos)[0]
        return out


# ----------------------------------------------------------------------------- NCC baseline


def ncc_map(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation (H, W) of a (2h+1)^2 patch at every pixel of ``image`` (H, W)
    (reflect padding at the border)."""
    ph, pw = patch.shape
    hy, hx = ph // 2, pw // 2
    t = patch - patch.mean()
    tn = t.norm()
    img = F.pad(image[None, None], (hx, hx, hy, hy), mode="reflect")
    n = ph * pw
    num = F.conv2d(img, t[None, None])[0, 0]
    box = torch.ones(1, 1, ph, pw, dtype=image.dtype)
    s1 = F.conv2d(img, box)[0, 0]
    s2 = F.conv2d(img * img, box)[0, 0]
    var = (s2 - s1 * s1 / n).clamp_min(0)
    return num / (tn * var.sqrt() + 1e-8)


def _patch(image: torch.Tensor, x: float, y: float, half: int) -> torch.Tensor:
    h, w = image.shape
    xs = torch.arange(-half, half + 1, dtype=torch.float64) + x
    ys = torch.arange(-half, half + 1, dtype=torch.float64) + y
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([(2 * gx + 1) / w - 1, (2 * gy + 1) / h - 1], -1)[None].to(image.dtype)
    return F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0, 0]


def ncc_locate(template: np.ndarray, points: np.ndarray, target: np.ndarray, half: int = 8) -> np.ndarray:
    """NCC template matching of intensity patches (2*half+1)^2 around each template point."""
    tmpl = torch.as_tensor(np.asarray(template, dtype=np.float64))
    tgt = torch.as_tensor(np.asarray(target, dtype=np.float64))
    out = np.zeros((len(points), 2))
    for i, (x, y) in enumerate(np.asarray(points, dtype=np.float64)):
        sc = ncc_map(tgt, _patch(tmpl, x, y, half))
        iy, ix = divmod(int(sc.flatten().argmax()), sc.shape[1])
        out[i] = subpixel_peak(sc, iy, ix)
    return out


# ----------------------------------------------------------------------------- training term


def _sample(e: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of e (1, D, H, W) at xy (..., 2) pixel coords -> (..., D)."""
    h, w = e.shape[-2:]
    g = torch.stack([(2 * xy[..., 0] + 1) / w - 1, (2 * xy[..., 1] + 1) / h - 1], -1)
    flat = g.reshape(1, -1, 1, 2).to(e.dtype)
    v = F.grid_sample(e, flat, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0]
    return v.t().reshape(*xy.shape[:-1], e.shape[1])


def centre_sensitive_loss(
    e1: torch.Tensor, e2: torch.Tensor, p2: torch.Tensor, q1: torch.Tensor, radius: int = 4,
    n_random: int = 64, temperature: float = 0.1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dense correspondence InfoNCE that is sensitive to the centre.

    ``e1``, ``e2`` (1, D, H, W) unit embeddings of an image and of a warped copy; ``p2`` (M, 2)
    pixels of the copy and ``q1`` (M, 2) their exact positions in the original. The anchor
    e2[p2] must pick e1[q1] out of e1 sampled at q1 + every integer offset within ``radius``
    (the near neighbours are the hard negatives) and at ``n_random`` random pixels.
    """
    h, w = e1.shape[-2:]
    r = int(radius)
    oy, ox = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    keep = (ox**2 + oy**2) <= r * r
    offs = torch.stack([ox[keep], oy[keep]], 1)  # (O, 2), includes (0, 0)
    centre = int(((offs**2).sum(1) == 0).nonzero()[0])
    m = p2.shape[0]
    cand = q1[:, None, :] + offs[None]  # (M, O, 2)
    rnd = torch.stack([torch.rand(m, n_random, generator=generator) * (w - 1), torch.rand(m, n_random, generator=generator) * (h - 1)], -1)
    cand = torch.cat([cand, rnd], 1)
    c = _sample(e1, cand)  # (M, O + R, D)
    a = _sample(e2, p2)  # (M, D)
    logits = torch.einsum("md,mod->mo", a, c) / temperature
    return F.cross_entropy(logits, torch.full((m,), centre, dtype=torch.long))


def train_centre_sensitive(
    model, images: np.ndarray, *, steps: int = 100, batch: int = 4, points_per_image: int = 64, lr: float = 1e-4,
    radius: int = 4, temperature: float = 0.1, seed: int = 0, progress: bool = True,
):
    """Fine-tune a copy of ``model`` with ``centre_sensitive_loss`` on random affine + elastic
    warps of ``images`` (M, H, W) in [0, 1] (no labels). Returns (model copy, loss history)."""
    import copy

    from tqdm import tqdm

    common.check_positive_int("steps", steps)
    net = copy.deepcopy(model)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    hist = []
    for _ in tqdm(range(steps), desc="centre-sensitive term", disable=not progress):
        idx = rng.integers(0, len(images), batch)
        v1, v2, warps = [], [], []
        for i in idx:
            wp = common.random_warp((h, w), rng, max_rotation_deg=30.0, scale_range=(0.85, 1.15), elastic_px=3.0)
            v1.append(np.clip(images[i] ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.02, (h, w)), 0, 1))
            t = common.warp_image(images[i], wp)
            v2.append(np.clip(np.clip(t, 0, 1) ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.02, (h, w)), 0, 1))
            warps.append((wp, t))
        z, _ = net(common.model_input(np.stack(v1 + v2).astype(np.float32)))
        e = z / (z.norm(dim=1, keepdim=True) + 1e-10)
        loss = 0.0
        for j, (wp, t) in enumerate(warps):
            fg = np.argwhere(t > 0.05)  # (row, col) of the warped copy
            if len(fg) == 0:
                continue
            pick = fg[rng.integers(0, len(fg), points_per_image)]
            p2 = pick[:, ::-1].astype(np.float64)
            q1 = wp.backward(p2)
            ok = (q1[:, 0] >= 0) & (q1[:, 0] <= w - 1) & (q1[:, 1] >= 0) & (q1[:, 1] <= h - 1)
            if ok.sum() < 2:
                continue
            loss = loss + centre_sensitive_loss(
                e[j : j + 1], e[batch + j : batch + j + 1], torch.as_tensor(p2[ok], dtype=torch.float32),
                torch.as_tensor(q1[ok], dtype=torch.float32), radius, temperature=temperature, generator=g,
            )
        loss = loss / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
    net.eval()
    return net, hist


# ----------------------------------------------------------------------------- points I/O


def load_points(path) -> tuple[list[str], np.ndarray]:
    """Landmarks from JSON: ``{"points": [{"name": ..., "x": ..., "y": ...}, ...]}``, a list of such
    objects, a list of ``[x, y]`` pairs, or ``{name: [x, y]}``. Pixel coordinates of the
    template as loaded: x = column, y = row, pixel centres at integers."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"points file not found: {str(path)!r}")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"points file {str(path)!r} is not valid JSON: {exc}") from exc
    if isinstance(obj, dict) and "points" in obj:
        obj = obj["points"]
    names, xy = [], []
    try:
        if isinstance(obj, dict):
            for k, v in obj.items():
                names.append(str(k))
                xy.append([float(v[0]), float(v[1])])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, dict):
                    names.append(str(v.get("name", f"p{i}")))
                    xy.append([float(v["x"]), float(v["y"])])
                else:
                    names.append(f"p{i}")
                    xy.append([float(v[0]), float(v[1])])
        else:
            raise TypeError
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"points file {str(path)!r}: expected {{'points': [{{'name','x','y'}}, ...]}}, a list of [x, y] "
            f"or {{name: [x, y]}}"
        ) from exc
    if not xy:
        raise ValueError(f"points file {str(path)!r} holds no points")
    arr = np.asarray(xy, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"points file {str(path)!r} holds non-finite coordinates")
    return names, arr


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
            img = img * (1.0 + bias * common._smooth_noise(rng, (h, w), max(h, w) / 4))
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
    progress: bool = True,
) -> dict:
    """Radial errors (px) of LD centre-sensitive, LD uniform and NCC (one entry per patch size).

    ``model`` is one LD network, or a dict ``{label: network}`` (e.g. with and without the
    centre-sensitive training term); each network gives a centre-sensitive and a uniform row.
    Points that the warp moves outside the image are left out.
    """
    from tqdm import tqdm

    models = model if isinstance(model, dict) else {"LD": model}
    locs = {}
    for label, net in models.items():
        t_emb, _ = common.embed(net, template[None])
        t_emb = t_emb.double()
        locs[f"{label} centre-sensitive"] = (net, LandmarkLocator(radii, "gaussian").fit(t_emb, points))
        locs[f"{label} uniform pooling"] = (net, LandmarkLocator(radii, "uniform").fit(t_emb, points))
    errors: dict[str, list] = {k: [] for k in locs}
    for hh in ncc_halves:
        errors[f"NCC {2 * hh + 1}x{2 * hh + 1}"] = []
    timing: dict[str, float] = {k: 0.0 for k in errors}
    h, w = template.shape
    for tgt, gt in tqdm(list(zip(targets, gts)), desc="landmark eval", disable=not progress):
        valid = (gt[:, 0] >= 0) & (gt[:, 0] <= w - 1) & (gt[:, 1] >= 0) & (gt[:, 1] <= h - 1)
        cache = {}
        for name, (net, loc) in locs.items():
            t0 = time.perf_counter()
            if id(net) not in cache:
                cache[id(net)] = common.embed(net, tgt[None])[0].double()
            pred = loc.locate(cache[id(net)])
            timing[name] += time.perf_counter() - t0
            errors[name].append(np.linalg.norm(pred - gt, axis=1)[valid])
        for hh in ncc_halves:
            t0 = time.perf_counter()
            pred = ncc_locate(template, points, tgt, hh)
            timing[f"NCC {2 * hh + 1}x{2 * hh + 1}"] += time.perf_counter() - t0
            errors[f"NCC {2 * hh + 1}x{2 * hh + 1}"].append(np.linalg.norm(pred - gt, axis=1)[valid])
    errs = {k: np.concatenate(v) for k, v in errors.items()}
    rows = radial_errors_table(errs)
    for r in rows:
        r["sec_per_image"] = timing[r["method"]] / max(len(targets), 1)
    return {"rows": rows, "errors": errs}


def plot_landmarks(path, template, points, target, gt, preds: dict, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 4.8))
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


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LD checkpoint (ld-ext pretrain)")
    parser.add_argument("--template", required=True, help="the one annotated template image")
    parser.add_argument("--points", required=True, help="landmarks of the template, JSON (x = column, y = row)")
    parser.add_argument("--targets", default=None, help="folder of target images to annotate")
    parser.add_argument("--out", required=True, help="output JSON (a PNG is written beside it)")
    parser.add_argument("--size", type=int, default=None, help="resize template and targets to SIZE x SIZE first")
    parser.add_argument("--radii", type=int, nargs="+", default=list(DEFAULT_RADII), help="pooling radii (px)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default="gaussian")
    parser.add_argument(
        "--evaluate", type=int, default=0, metavar="N",
        help="instead of (or besides) --targets: warp the template N times with random known "
        "affine+elastic deformations and report radial errors for LD and NCC",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--centre-term-steps", type=int, default=0, metavar="N",
        help="first fine-tune the network N steps with the centre-sensitive training term on random warps "
        "of the template and the target images (no labels; default 0 = off)",
    )


def _load_scaled(path, size):
    img = common.scale_intensity(common.load_image(path))
    if size is not None:
        img = common.resize_image(img, size)
    return img


def run(args: argparse.Namespace) -> int:
    if args.targets is None and not args.evaluate:
        raise ValueError("give --targets DIR and/or --evaluate N")
    if args.evaluate < 0:
        raise ValueError(f"--evaluate must be >= 0, got {args.evaluate}")
    if args.size is not None:
        common.check_positive_int("--size", args.size, 16)
    model = common.load_ld_model(args.checkpoint)
    raw = common.load_image(args.template)
    template = _load_scaled(args.template, args.size)
    names, points = load_points(args.points)
    if args.size is not None:  # points are given on the template as stored
        sy, sx = template.shape[0] / raw.shape[0], template.shape[1] / raw.shape[1]
        points = np.stack([(points[:, 0] + 0.5) * sx - 0.5, (points[:, 1] + 0.5) * sy - 0.5], 1)
    h, w = template.shape
    if ((points[:, 0] < 0) | (points[:, 0] > w - 1) | (points[:, 1] < 0) | (points[:, 1] > h - 1)).any():
        raise ValueError(f"points: every landmark must lie inside the template ({w}x{h} px)")
    out = Path(args.out)
    result: dict = {"template": str(args.template), "landmarks": names, "pooling": args.pooling, "radii": args.radii}
    if args.centre_term_steps < 0:
        raise ValueError(f"--centre-term-steps must be >= 0, got {args.centre_term_steps}")
    if args.centre_term_steps:
        pool = [template]
        if args.targets is not None:
            pool += [img for img in (_load_scaled(f, args.size) for f in common.list_images(args.targets, "targets"))
                     if img.shape == template.shape]
        model, hist = train_centre_sensitive(model, np.stack(pool), steps=args.centre_term_steps, seed=args.seed)
        result["centre_term"] = {"steps": args.centre_term_steps, "loss_first": hist[0], "loss_last": hist[-1]}
    if args.targets is not None:
        t_emb, _ = common.embed(model, template[None])
        loc = LandmarkLocator(args.radii, args.pooling).fit(t_emb.double(), points)
        preds = {}
        files = common.list_images(args.targets, "targets")
        from tqdm import tqdm

        first = None
        for f in tqdm(files, desc="landmarks"):
            img = _load_scaled(f, args.size)
            e, _ = common.embed(model, img[None])
            p = loc.locate(e.double())
            preds[f.name] = {n: [float(x), float(y)] for n, (x, y) in zip(names, p)}
            if first is None:
                first = (img, p)
        result["predictions"] = preds
        plot_landmarks(out.with_suffix(".png"), template, points, first[0], None, {"LD": first[1]}, files[0].name)
    if args.evaluate:
        targets, gts = make_eval_targets(template, points, args.evaluate, seed=args.seed)
        ev = evaluate_methods(model, template, points, targets, gts, args.radii)
        result["evaluation"] = {"n_targets": args.evaluate, "rows": ev["rows"]}
        print(table_markdown(ev["rows"]))
    common.atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0
