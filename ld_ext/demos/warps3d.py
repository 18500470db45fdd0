"""The data of ``ld-ext demo --dims 3``: random warped copies of the MNI152 template (nilearn's files, read
by ``ld_ext.demos.mni``) and of its small structures, on a coarse grid, as NIfTI volumes.

* ``DemoGrid`` / ``demo_grid``: the output grid, a box around the template's brain (plus ``MARGIN_MM``)
  at ``spacing`` mm per voxel, axis-aligned and RAS+ like the template (``affine``).
* ``WarpConfig``: how far a copy moves from the template, fixed in advance as plausible differences
  between roughly aligned brains (never chosen on the demo's scores): per-axis rotations, scalings and
  shifts (the affine part), a smooth random displacement (the elastic part: a coarse grid of
  Gaussian displacements, trilinearly upsampled) and intensity changes (gamma, a smooth
  multiplicative bias field, noise, an arbitrary overall scale as in MR units).
* ``warp_copy``: one warped copy (image float32, integer labels: 0 background, ``i + 1`` for
  ``STRUCTURES[i]``), everything drawn from one ``torch.Generator``.
* ``write_warps``: ``n`` copies written as ``NAME_###.nii.gz`` (and label volumes in a second folder).

The template and the structure masks are smoothed before sampling (``source_volumes``: Gaussian, sigma
``0.4 * spacing`` mm), so that the coarse copies are anti-aliased; a label is the structure whose smoothed
mask is largest at the voxel, where it is above 0.5.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes
from ..data import scale_intensity
from .mni import STRUCTURES, mni_volume, structure_volume

__all__ = [
    "MARGIN_MM",
    "DemoGrid",
    "demo_grid",
    "WarpConfig",
    "source_volumes",
    "random_displacement",
    "warp_copy",
    "write_nifti",
    "write_warps",
]

MARGIN_MM = 4.0
_SOURCES: dict = {}


@dataclass(frozen=True)
class DemoGrid:
    """An axis-aligned RAS+ grid: ``shape`` voxels of ``spacing`` mm, the first voxel's centre at ``origin`` (mm)."""

    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    def mm(self) -> torch.Tensor:
        """The voxel centres in mm, (X, Y, Z, 3) float64."""
        axes = [o + self.spacing * torch.arange(n, dtype=torch.float64) for o, n in zip(self.origin, self.shape)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def demo_grid(spacing: float) -> DemoGrid:
    """The grid of the demo's volumes: the template's brain box plus ``MARGIN_MM`` on each side, at ``spacing`` mm."""
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 1.0 <= spacing <= 8.0:
        raise ValueError(f"spacing must be a number of mm in [1, 8], got {spacing!r}")
    t1, aff = mni_volume("t1")
    idx = np.argwhere(t1 > 0)
    lo = aff[:3, :3] @ idx.min(0) + aff[:3, 3] - MARGIN_MM
    hi = aff[:3, :3] @ idx.max(0) + aff[:3, 3] + MARGIN_MM
    shape = tuple(int(math.ceil((b - a) / spacing)) + 1 for a, b in zip(lo, hi))
    centre = (lo + hi) / 2
    origin = tuple(float(c - spacing * (n - 1) / 2) for c, n in zip(centre, shape))
    return DemoGrid(shape, float(spacing), origin)


@dataclass(frozen=True)
class WarpConfig:
    """How far a warped copy moves from the template (module docstring); the defaults are the demo's."""

    rotation_deg: float = 8.0  # per axis, uniform in [-r, r]
    scale: float = 0.08  # per axis, log-uniform in [1 - s, 1 + s]
    shift_mm: float = 6.0  # per axis, uniform in [-t, t]
    elastic_mm: float = 3.0  # std of each displacement component at the control points
    elastic_points: int = 5  # control points per axis
    gamma: float = 1.4  # intensity ** g, g log-uniform in [1/gamma, gamma]
    bias: float = 0.1  # std of the log bias field at its 3x3x3 control points
    noise: float = 0.02  # std of Gaussian noise (intensities in [0, 1] before the overall scale)


def source_volumes(spacing: float) -> tuple[torch.Tensor, np.ndarray]:
    """``(volumes, affine)``: (1, 1 + len(STRUCTURES), X, Y, Z) float32, the T1 template scaled by its
    percentiles (0.5, 99.5) to [0, 1] and each structure's mask, smoothed for ``spacing`` (Gaussian, sigma
    ``0.4 * spacing`` mm in all, of which averaging blocks of ``f`` = round(spacing / 2) voxels gives part),
    on the template's grid coarsened by ``f``, and that grid's affine. Cached for the last spacing."""
    key = round(float(spacing), 6)
    if key not in _SOURCES:
        from scipy.ndimage import gaussian_filter  # lazy: optional package

        t1, aff = mni_volume("t1")
        t1 = np.clip(scale_intensity(t1, (0.5, 99.5)), 0.0, 1.0)
        vols = torch.from_numpy(np.stack([t1] + [structure_volume(name) for name in STRUCTURES]).astype(np.float32))
        f = max(1, int(round(spacing / 2)))
        if f > 1:
            vols = F.avg_pool3d(vols[None], f, ceil_mode=True)[0]
        sigma = math.sqrt(max(0.0, (0.4 * spacing) ** 2 - (f * f - 1) / 12.0)) / f  # in coarse voxels
        smooth = np.stack([gaussian_filter(v, sigma) if sigma > 0.3 else v for v in vols.numpy()])
        coarse = aff.copy()
        coarse[:3, :3] = aff[:3, :3] * f
        coarse[:3, 3] = aff[:3, 3] + aff[:3, :3] @ np.full(3, (f - 1) / 2.0)  # the centre of the first block
        _SOURCES.clear()  # one spacing at a time
        _SOURCES[key] = (torch.from_numpy(smooth.astype(np.float32))[None], coarse)
    return _SOURCES[key]


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 3) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _affine_part(g: torch.Generator, cfg: WarpConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(3x3 matrix, shift mm): rotations about x, y, z times per-axis scalings; a uniform shift."""
    ang = torch.deg2rad(_uniform(g, -cfg.rotation_deg, cfg.rotation_deg))
    c, s = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    rx = torch.stack([one, zero, zero, zero, c[0], -s[0], zero, s[0], c[0]]).reshape(3, 3)
    ry = torch.stack([c[1], zero, s[1], zero, one, zero, -s[1], zero, c[1]]).reshape(3, 3)
    rz = torch.stack([c[2], -s[2], zero, s[2], c[2], zero, zero, zero, one]).reshape(3, 3)
    scale = torch.exp(_uniform(g, math.log(1 - cfg.scale), math.log(1 + cfg.scale)))
    return rz @ ry @ rx @ torch.diag(scale), _uniform(g, -cfg.shift_mm, cfg.shift_mm)


def random_displacement(g: torch.Generator, shape, points: int, std: float, channels: int = 3) -> torch.Tensor:
    """A smooth random field (channels, X, Y, Z) float64: Gaussian values (``std``) at ``points`` control
    points per axis spanning the grid, trilinearly upsampled to ``shape``."""
    coarse = std * torch.randn((1, channels, points, points, points), generator=g, dtype=torch.float64)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _template_coords(grid: DemoGrid, g: torch.Generator, cfg: WarpConfig, aff: np.ndarray, shape) -> torch.Tensor:
    """Where each voxel of ``grid`` samples the template (on a grid of ``shape`` voxels with ``aff``), as
    grid_sample coordinates (1, X, Y, Z, 3)."""
    mm = grid.mm()  # (X, Y, Z, 3)
    mat, shift = _affine_part(g, cfg)
    centre = mm.reshape(-1, 3).mean(0)
    src = (mm - centre) @ mat.T + centre + shift
    src = src + random_displacement(g, grid.shape, cfg.elastic_points, cfg.elastic_mm).permute(1, 2, 3, 0)
    ijk = (src - torch.from_numpy(aff[:3, 3])) @ torch.from_numpy(np.linalg.inv(aff[:3, :3])).T
    size = torch.tensor(tuple(shape), dtype=torch.float64)
    norm = 2.0 * ijk / (size - 1) - 1.0  # align_corners=True
    return norm.flip(-1)[None].float()  # grid_sample's last axis is (W, H, D) = (Z, Y, X) here


def _intensity(image: torch.Tensor, g: torch.Generator, cfg: WarpConfig) -> torch.Tensor:
    """Gamma, bias field, noise and an overall scale (module docstring) of an image in [0, 1]."""
    gamma = math.exp(float(_uniform(g, -math.log(cfg.gamma), math.log(cfg.gamma), 1)))
    out = image.clamp(0, 1).double() ** gamma
    out = out * torch.exp(random_displacement(g, image.shape, 3, cfg.bias, channels=1)[0])
    out = (out + cfg.noise * torch.randn(image.shape, generator=g, dtype=torch.float64)).abs()
    return (out * float(_uniform(g, 500.0, 1500.0, 1))).float()


def warp_copy(grid: DemoGrid, g: torch.Generator, cfg: WarpConfig = WarpConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One warped copy on ``grid``: (image float32 (X, Y, Z) in arbitrary units, labels uint8 (X, Y, Z))."""
    src, aff = source_volumes(grid.spacing)
    coords = _template_coords(grid, g, cfg, aff, src.shape[2:])
    out = F.grid_sample(src, coords, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    masks = out[1:]
    best, which = masks.max(0)
    labels = torch.where(best > 0.5, which + 1, torch.zeros_like(which)).to(torch.uint8)
    return _intensity(out[0], g, cfg).numpy(), labels.numpy()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """``array`` as a gzipped NIfTI file with ``affine`` (written atomically)."""
    import nibabel as nib  # lazy: optional package

    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    atomic_write_bytes(path, data)
    return path


def write_warps(
    images: Path,
    labels: Path | None,
    n: int,
    seed: int,
    grid: DemoGrid,
    *,
    name: str = "warp",
    cfg: WarpConfig = WarpConfig(),
    on_step=None,
) -> list[Path]:
    """``n`` warped copies as ``images/NAME_###.nii.gz`` (and their label volumes under ``labels`` when
    given); copy ``i`` is drawn from the generator seeded with ``(seed, i)``. ``on_step()`` after each."""
    images.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        labels.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1_000_003 * int(seed) + i)
        image, lab = warp_copy(grid, g, cfg)
        paths.append(write_nifti(images / f"{name}_{i:03d}.nii.gz", image, grid.affine))
        if labels is not None:
            write_nifti(labels / f"{name}_{i:03d}.nii.gz", lab, grid.affine)
        if on_step is not None:
            on_step()
    return paths
