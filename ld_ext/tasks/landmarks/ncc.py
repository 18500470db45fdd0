"""The baseline: normalised cross-correlation (NCC) of intensity patches, through the same search."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .search import locate_image

# ----------------------------------------------------------------------------- NCC baseline


def ncc_map(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation (H, W) of a (2h+1)^2 patch at every pixel of ``image`` (H, W)
    (reflect padding at the border)."""
    return ncc_maps(image, patch[None])[0]


def ncc_maps(image: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """NCC maps (M, H, W) of M same-sized odd patches (M, ph, pw) over ``image`` (H, W), one
    convolution for all (reflect padding at the border)."""
    m, ph, pw = patches.shape
    hy, hx = ph // 2, pw // 2
    t = patches - patches.mean(dim=(1, 2), keepdim=True)
    tn = t.flatten(1).norm(dim=1)
    img = F.pad(image[None, None], (hx, hx, hy, hy), mode="reflect")
    n = ph * pw
    num = F.conv2d(img, t[:, None])[0]
    box = torch.ones(1, 1, ph, pw, dtype=image.dtype)
    s1 = F.conv2d(img, box)[0, 0]
    s2 = F.conv2d(img * img, box)[0, 0]
    var = (s2 - s1 * s1 / n).clamp_min(0)
    return num / (tn[:, None, None] * var.sqrt()[None] + 1e-8)


def _patch(image: torch.Tensor, x: float, y: float, half: int) -> torch.Tensor:
    h, w = image.shape
    xs = torch.arange(-half, half + 1, dtype=torch.float64) + x
    ys = torch.arange(-half, half + 1, dtype=torch.float64) + y
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([(2 * gx + 1) / w - 1, (2 * gy + 1) / h - 1], -1)[None].to(image.dtype)
    return F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0, 0]


def ncc_score_maps(template: np.ndarray, points: np.ndarray, target: np.ndarray, half: int = 8) -> torch.Tensor:
    """NCC maps (M, H, W) of the intensity patches (2*half+1)^2 around each template point."""
    tmpl = torch.as_tensor(np.asarray(template, dtype=np.float64))
    tgt = torch.as_tensor(np.asarray(target, dtype=np.float64))
    patches = torch.stack([_patch(tmpl, x, y, half) for x, y in np.asarray(points, dtype=np.float64)])
    return ncc_maps(tgt, patches)


def _zero_mean_unit(u: torch.Tensor, dim: int) -> torch.Tensor:
    """``u`` minus its mean along ``dim``, divided by its norm (+1e-8) along ``dim``."""
    u = u - u.mean(dim, keepdim=True)
    return u / (u.norm(dim=dim, keepdim=True) + 1e-8)


def ncc_patch_field(image: np.ndarray | torch.Tensor, half: int) -> torch.Tensor:
    """The (2*half+1)^2 intensity patch around every pixel of ``image`` (H, W), zero-mean and
    unit-norm: (1, (2*half+1)^2, H, W) (reflect padding). The inner product of two such patches
    is their NCC, so this is the descriptor field of the NCC matcher."""
    t = torch.as_tensor(np.asarray(image, dtype=np.float64))[None, None]
    k = 2 * half + 1
    u = _zero_mean_unit(F.unfold(F.pad(t, (half,) * 4, mode="reflect"), k), 1)  # (1, k*k, H*W)
    return u.reshape(1, k * k, *t.shape[-2:])


def ncc_locate(
    template: np.ndarray, points: np.ndarray, target: np.ndarray, half: int = 8, rectified: bool = True, **search
) -> np.ndarray:
    """NCC template matching of intensity patches (2*half+1)^2 around each template point, with
    exactly the search of LD (``locate_image``: ``rectified`` and the ``search`` keywords; with
    ``subpixel="gauss-newton"`` the refinement works on the normalised patches, ``ncc_patch_field``)."""
    pts = np.asarray(points, dtype=np.float64)
    if search.get("subpixel") == "gauss-newton":
        tmpl = torch.as_tensor(np.asarray(template, dtype=np.float64))
        protos = _zero_mean_unit(torch.stack([_patch(tmpl, x, y, half).flatten() for x, y in pts]), 1)
        fn = lambda img: (ncc_score_maps(template, pts, img, half), (ncc_patch_field(img, half), protos))  # noqa: E731
    else:
        fn = lambda img: ncc_score_maps(template, pts, img, half)  # noqa: E731
    return locate_image(fn, target, pts, np.asarray(template).shape, rectified=rectified, **search)[0]
