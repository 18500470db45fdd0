"""Pooled LD descriptors: centre-sensitive (Gaussian) or uniform pooling of unit pixel embeddings
over nested discs, exact pooling at fractional centres, and cosine maps through the fused op."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ... import ops

# defaults = the centre-sensitive settings selected on development data (evaluation.SELECTED_LD)
DEFAULT_RADII = (0, 1, 2, 4, 8)
DEFAULT_SIGMA_FRAC = 1.0
DEFAULT_EDGE = "soft"  # of the locator; the pooling functions default to the plain (hard) disc
DEFAULT_FRACTIONAL = "exact"
DEFAULT_JAC_STEP = 0.5
POOLING_MODES = ("gaussian", "uniform")
EDGE_MODES = ("hard", "soft")
FRACTIONAL_MODES = ("bilinear", "exact")

# ----------------------------------------------------------------------------- pooling


def check_pooling(mode: str, sigma_frac: float, edge: str) -> None:
    """ValueError unless ``mode``, ``sigma_frac`` and ``edge`` are valid pooling settings."""
    if mode not in POOLING_MODES:
        raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac!r}")
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {EDGE_MODES}, got {edge!r}")


def check_radii(radii) -> tuple[int, ...]:
    """The pooling radii as a tuple of ints; ValueError unless a non-empty sequence of ints >= 0."""
    try:
        out = tuple(radii)
    except TypeError:
        raise ValueError(f"radii must be a sequence of ints >= 0, got {radii!r}") from None
    if not out:
        raise ValueError("radii must not be empty")
    if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0 for r in out):
        raise ValueError(f"radii must be ints >= 0, got {radii!r}")
    return tuple(int(r) for r in out)


def _window_weights(dist: torch.Tensor, r: int, mode: str, sigma_frac: float, edge: str) -> torch.Tensor:
    """Unnormalised pooling weights at distances ``dist`` from the centre (any shape, r >= 1):
    the Gaussian (sigma = sigma_frac * r) or 1, times the disc's edge: ``"hard"`` dist <= r,
    ``"soft"`` clamp(r + 0.5 - dist, 0, 1) (anti-aliased: continuous in the centre)."""
    if edge == "hard":
        inside = (dist * dist <= r * r + 1e-9).to(dist.dtype)
    else:
        inside = (r + 0.5 - dist).clamp(0.0, 1.0)
    if mode == "gaussian":
        sigma = sigma_frac * r
        return torch.exp(-dist * dist / (2 * sigma * sigma)) * inside
    return inside


def pooling_kernel(
    radius: int, mode: str = "gaussian", dtype=torch.float32, sigma_frac: float = DEFAULT_SIGMA_FRAC, edge: str = "hard"
) -> torch.Tensor:
    """(2r+1, 2r+1) weights summing to 1 on the disc of radius r: Gaussian (sigma = sigma_frac * r,
    truncated at r) or uniform. Both modes have the same support. ``edge="soft"``: the disc's rim
    is anti-aliased, weight x clamp(r + 0.5 - distance, 0, 1) (see ``fractional_descriptors``)."""
    check_pooling(mode, sigma_frac, edge)
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    r = int(radius)
    if r == 0:
        return torch.ones(1, 1, dtype=dtype)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1, dtype=dtype), torch.arange(-r, r + 1, dtype=dtype), indexing="ij")
    w = _window_weights(torch.sqrt(xx**2 + yy**2), r, mode, sigma_frac, edge)
    return w / w.sum()


def pooled_descriptors(
    e: torch.Tensor,
    radii: Sequence[int] = DEFAULT_RADII,
    mode: str = "gaussian",
    sigma_frac: float = DEFAULT_SIGMA_FRAC,
    edge: str = "hard",
) -> torch.Tensor:
    """Pooled descriptor maps (N, R*D, H, W) of unit embeddings e (N, D, H, W).

    Each radius: depthwise convolution with ``pooling_kernel`` (weights renormalised over the
    part of the disc inside the image), per-pixel L2 normalisation; concatenated over radii and
    divided by sqrt(R), so every pixel's descriptor is a unit vector. ``edge``: see
    ``pooling_kernel``.
    """
    if e.dim() != 4:
        raise ValueError(f"e must have shape (N, D, H, W), got {tuple(e.shape)}")
    radii = check_radii(radii)
    n, d, h, w = e.shape
    parts = []
    ones = torch.ones(1, 1, h, w, dtype=e.dtype)
    for r in radii:
        k = pooling_kernel(r, mode, dtype=e.dtype, sigma_frac=sigma_frac, edge=edge)
        pooled = _same_conv_fft(e, k) / _same_conv_fft(ones, k).clamp_min(1e-12)
        parts.append(pooled)
    return _unit_concat(parts)


def _unit_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-radius descriptors (channels in dim 1) L2-normalised, concatenated and divided by
    sqrt(R): one unit vector whose inner products are the mean cosine over radii."""
    unit = [p / (p.norm(dim=1, keepdim=True) + 1e-10) for p in parts]
    return torch.cat(unit, dim=1) / math.sqrt(len(parts))


def _same_conv_fft(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Zero-padded 'same' convolution of every channel of x (N, C, H, W) with a centred odd
    kernel k (kh, kw), by FFT (depthwise conv2d with large kernels is slow on CPU)."""
    h, w = x.shape[-2:]
    kh, kw = k.shape
    fh, fw = h + kh - 1, w + kw - 1
    y = torch.fft.irfft2(torch.fft.rfft2(x, s=(fh, fw)) * torch.fft.rfft2(k, s=(fh, fw)), s=(fh, fw))
    return y[..., kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w]


def sample_bilinear(e: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of e (1, D, H, W) at xy (..., 2) pixel coords -> (..., D)."""
    h, w = e.shape[-2:]
    g = torch.stack([(2 * xy[..., 0] + 1) / w - 1, (2 * xy[..., 1] + 1) / h - 1], -1)
    flat = g.reshape(1, -1, 1, 2).to(e.device, e.dtype)
    v = F.grid_sample(e, flat, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0]
    return v.t().reshape(*xy.shape[:-1], e.shape[1])


def sample_descriptors(desc: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """Bilinear samples (M, C) of one descriptor map (1, C, H, W) at points (M, 2) (x, y),
    returned as unit vectors."""
    v = sample_bilinear(desc, torch.as_tensor(np.asarray(points, dtype=np.float64), dtype=desc.dtype))
    return v / (v.norm(dim=1, keepdim=True) + 1e-10)


def fractional_descriptors(
    e: torch.Tensor,
    points,
    radii: Sequence[int] = DEFAULT_RADII,
    mode: str = "gaussian",
    sigma_frac: float = DEFAULT_SIGMA_FRAC,
    edge: str = "hard",
) -> torch.Tensor:
    """Pooled descriptors (M, R*D) of unit embeddings e (1, D, H, W) evaluated exactly at
    fractional centres ``points`` (M, 2) (x, y), instead of interpolating the pooled field.

    Radius r >= 1: every pixel q weighted by the pooling window centred at the point,
    w(|q - c|) (``pooling_kernel``'s weights at fractional offsets; pixels outside the image are
    left out and the weights renormalised, as in ``pooled_descriptors``); radius 0: the bilinear
    interpolation of e at c. Each radius L2-normalised, concatenated, divided by sqrt(R). At an
    integer centre this equals ``pooled_descriptors(e, radii, mode, sigma_frac, edge)`` there. A
    Gaussian with ``edge="soft"`` (or a uniform disc with ``edge="soft"``) varies continuously
    with c; with ``edge="hard"`` pixels enter and leave the disc as c moves.
    """
    check_pooling(mode, sigma_frac, edge)
    if not isinstance(e, torch.Tensor) or e.dim() != 4 or e.shape[0] != 1:
        raise ValueError(f"e must be a tensor of shape (1, D, H, W), got {getattr(e, 'shape', type(e))}")
    radii = check_radii(radii)
    c = torch.as_tensor(np.asarray(points, dtype=np.float64) if not isinstance(points, torch.Tensor) else points)
    c = c.to(torch.float64)
    if c.dim() != 2 or c.shape[1] != 2:
        raise ValueError(f"points must have shape (M, 2), got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("points must be finite")
    _, d, h, w = e.shape
    m = c.shape[0]
    rmax = max(radii)
    parts = []
    if rmax > 0:
        # one window of pixels around every centre, shared by all radii
        o = torch.arange(-rmax - 1, rmax + 2, dtype=torch.float64)
        oy, ox = torch.meshgrid(o, o, indexing="ij")
        base = torch.floor(c)  # (M, 2)
        qx = base[:, 0, None] + ox.reshape(1, -1)  # (M, K)
        qy = base[:, 1, None] + oy.reshape(1, -1)
        valid = (qx >= 0) & (qx <= w - 1) & (qy >= 0) & (qy <= h - 1)
        idx = (qy.clamp(0, h - 1) * w + qx.clamp(0, w - 1)).long()
        vals = e[0].reshape(d, h * w).t()[idx]  # (M, K, D)
        dist = torch.sqrt((qx - c[:, 0, None]) ** 2 + (qy - c[:, 1, None]) ** 2)
    for r in radii:
        if r == 0:
            v = sample_bilinear(e, c.to(e.dtype)).to(e.dtype) if m else e.new_zeros(0, d)
        else:
            wgt = _window_weights(dist, int(r), mode, sigma_frac, edge) * valid
            wgt = (wgt / wgt.sum(1, keepdim=True).clamp_min(1e-12)).to(e.dtype)
            v = torch.einsum("mk,mkd->md", wgt, vals)
        parts.append(v)
    return _unit_concat(parts)


class FractionalSampler:
    """The descriptor D(p) of ``fractional_descriptors`` as a function of the position (for
    ``refine_gauss_newton``): ``sampler(xy)`` (M, C) and ``sampler.jacobian(xy)`` (M, C, 2) by
    central differences of ``step`` px."""

    def __init__(
        self,
        e: torch.Tensor,
        radii: Sequence[int] = DEFAULT_RADII,
        mode: str = "gaussian",
        sigma_frac: float = DEFAULT_SIGMA_FRAC,
        edge: str = "hard",
        step: float = DEFAULT_JAC_STEP,
    ) -> None:
        check_pooling(mode, sigma_frac, edge)
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step!r}")
        self.e, self.radii, self.mode, self.sigma_frac, self.edge = e, check_radii(radii), mode, sigma_frac, edge
        self.step = float(step)

    def __call__(self, xy: torch.Tensor) -> torch.Tensor:
        return fractional_descriptors(self.e, xy, self.radii, self.mode, self.sigma_frac, self.edge)

    def jacobian(self, xy: torch.Tensor) -> torch.Tensor:
        s = self.step
        ex = torch.tensor([s, 0.0], dtype=torch.float64)
        ey = torch.tensor([0.0, s], dtype=torch.float64)
        m = xy.shape[0]
        both = self(torch.cat([xy + ex, xy - ex, xy + ey, xy - ey], 0)).to(torch.float64)
        dx = (both[:m] - both[m : 2 * m]) / (2 * s)
        dy = (both[2 * m : 3 * m] - both[3 * m :]) / (2 * s)
        return torch.stack([dx, dy], -1)


def cosine_maps(desc: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """<proto_k, desc_p> for shared prototypes (K, C) or per-image prototypes (N, K, C), through
    the fused softmax-over-prototypes op: with an extra all-zero prototype at temperature 1,
    log S_k - log S_zero is exactly the inner product."""
    if protos.dim() == 2:
        zero = torch.zeros(1, protos.shape[1], dtype=protos.dtype)
        p = torch.cat([protos, zero], 0)
    else:
        zero = torch.zeros(protos.shape[0], 1, protos.shape[2], dtype=protos.dtype)
        p = torch.cat([protos, zero], 1)
    s = ops.pixel_cluster_similarity(desc.contiguous(), p.contiguous(), temperature=1.0, normalize=False)
    k = p.shape[-2] - 1
    return torch.log(s[:, :k]) - torch.log(s[:, k : k + 1])
