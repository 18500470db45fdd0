"""The MNI152 data that ships inside nilearn, read with nibabel (nothing is downloaded): the one
MNI152 loader of ld_ext, used by every demo.

* ``mni_files`` / ``mni_volume``: the ICBM152 2009a symmetric T1 template (1 mm,
  skull-stripped) and its grey/white-matter probability maps, each cached once per process.
* ``load_mni_slices``: the pre-training demo's data: all axial slices that contain brain, padded
  to a square and resized, with tissue probabilities (background, CSF, GM, WM), a train/held-out
  split and optionally masks of small structures.
* ``axial_slice`` / ``mni_axial_slice`` / ``mni_slices`` / ``mni_to_pixel``: axial slices at given
  heights in mm (the task demos), and the pixel of an MNI coordinate on such a slice.
* ``STRUCTURES`` / ``structure_volume`` / ``structure_slices`` / ``ventricle_slice``: small
  structures defined on the template's voxel grid from the tissue maps and MNI boxes (no atlas of
  deep nuclei ships with nilearn, so these are approximations): GM > 0.5 inside boxes around the
  striatum and the thalamus, WM > 0.5 near the midline (the corpus callosum and fornix), and the
  ventricles = voxels inside the brain where 1 - GM - WM > 0.5, restricted to a central box
  (|x| <= 24 mm, -45 <= y <= 30 mm, -5 <= z <= 35 mm), i.e. the lateral and third ventricles.
* ``dosenbach_rois``: the Dosenbach et al. (2010) ROI centres (MNI mm) shipped with nilearn.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import scale_intensity
from ..tasks.common import resize_image

__all__ = [
    "MNI_FILES",
    "LABEL_NAMES",
    "STRUCTURES",
    "nilearn_data_dir",
    "mni_files",
    "mni_volume",
    "load_mni_slices",
    "tissue_labels",
    "axial_slice",
    "mni_axial_slice",
    "mni_slices",
    "mni_to_pixel",
    "structure_volume",
    "structure_slices",
    "ventricle_slice",
    "dosenbach_rois",
]

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABEL_NAMES = ("background", "CSF", "GM", "WM")
STRUCTURES = ("ventricles", "striatum", "thalamus", "corpus_callosum")
_MNI_CACHE: dict = {}


# ----------------------------------------------------------------------------- files and volumes


def nilearn_data_dir() -> Path:
    """The folder of data files that ships inside the nilearn package."""
    try:
        import nilearn
    except ImportError as exc:
        raise ImportError("the demos need the optional package 'nilearn' (pip install nilearn nibabel)") from exc
    return Path(nilearn.__file__).parent / "datasets" / "data"


def mni_files() -> dict[str, Path]:
    """Paths of the T1 template and GM/WM maps inside the installed nilearn package."""
    data = nilearn_data_dir()
    files = {k: data / v for k, v in MNI_FILES.items()}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        import nilearn

        raise FileNotFoundError(f"nilearn {nilearn.__version__} does not ship the MNI152 2009a files: {missing}")
    return files


def _raw_volume(name: str):
    """``(volume float32 in the file's units, affine)``, read once per process."""
    if name not in MNI_FILES:
        raise ValueError(f"name must be one of {sorted(MNI_FILES)}, got {name!r}")
    key = "raw_" + name
    if key not in _MNI_CACHE:
        import nibabel as nib

        img = nib.load(str(mni_files()[name]))
        _MNI_CACHE[key] = (np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, dtype=np.float64))
    return _MNI_CACHE[key]


def mni_volume(name: str):
    """``(volume float32 (X, Y, Z), affine)`` of the ICBM152 2009a template ("t1"), or its grey
    ("gm") / white ("wm") matter probability map, divided by its maximum (values in [0, 1])."""
    if name not in _MNI_CACHE:
        vol, aff = _raw_volume(name)
        _MNI_CACHE[name] = (vol / max(float(vol.max()), 1e-6), aff)
    return _MNI_CACHE[name]


# ----------------------------------------------------------------------------- the pre-training demo's slices


def _square_resize(x: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) -> pad to a square with ``value``, bilinear resize to size x size."""
    h, w = x.shape[-2:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    x = F.pad(x, (left, s - w - left, top, s - h - top), value=value)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=s > size)


def load_mni_slices(
    size: int = 128, axis: int = 2, min_brain: float = 0.05, holdout_every: int = 5, structures: tuple = ()
) -> dict:
    """Axial slices of the template with tissue probabilities, split into train / held-out.

    Returns ``images`` (N, 1, S, S) in [0, 1], ``probs`` (N, 4, S, S) (background, CSF, GM, WM),
    ``index`` (slice numbers), ``train``/``test`` boolean masks (every ``holdout_every``-th
    slice is held out) and, for each name in ``structures`` (``STRUCTURES``),
    ``structures[name]`` (N, S, S) boolean masks.
    """
    t1 = _raw_volume("t1")[0]  # scaled by its own percentiles below
    gm = mni_volume("gm")[0]
    wm = mni_volume("wm")[0]
    brain = (t1 > 0).astype(np.float32)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    bg = 1.0 - brain
    t1 = scale_intensity(t1, (0.5, 99.5))
    other = tuple(a for a in range(3) if a != axis)
    keep = np.nonzero(brain.mean(axis=other) >= min_brain)[0].tolist()
    if not keep:
        raise ValueError("no template slice contains enough brain")

    def stack(vol):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, axis, 0)[keep]))

    images = _square_resize(stack(t1)[:, None], size).clamp(0, 1)
    probs = torch.cat(
        [
            _square_resize(stack(bg)[:, None], size, value=1.0),  # the padding is background
            _square_resize(torch.stack([stack(csf), stack(gm * brain), stack(wm * brain)], 1), size),
        ],
        1,
    )
    index = torch.tensor(keep)
    test = (torch.arange(len(keep)) % holdout_every) == (holdout_every // 2)
    out = {"images": images, "probs": probs, "index": index, "test": test, "train": ~test}
    if structures:
        out["structures"] = {
            name: _square_resize(stack(structure_volume(name))[:, None], size)[:, 0] > 0.5 for name in structures
        }
    return out


def tissue_labels(probs: torch.Tensor) -> torch.Tensor:
    """(N, 4, S, S) probabilities -> (N, S, S) labels 0..3 (background, CSF, GM, WM)."""
    return probs.argmax(1)


# ----------------------------------------------------------------------------- axial slices in mm


def _slice_geometry(vol_shape, size: int):
    nx, ny = vol_shape[0], vol_shape[1]
    side = max(nx, ny)
    return side, (side - nx) / 2.0, (side - ny) / 2.0, side / float(size)


def axial_slice(vol: np.ndarray, aff: np.ndarray, z_mm: float, size: int) -> np.ndarray:
    """An axial slice of a volume (X, Y, Z) with an axis-aligned affine at height ``z_mm``
    (anterior at the top, image x growing with MNI x), padded to a square and resampled
    (anti-aliased) to ``size x size``; linear interpolation between voxel planes."""
    k = (z_mm - aff[2, 3]) / aff[2, 2]
    k0 = int(np.clip(math.floor(k), 0, vol.shape[2] - 2))
    w = float(np.clip(k - k0, 0.0, 1.0))
    sl = (1 - w) * vol[:, :, k0] + w * vol[:, :, k0 + 1]  # (X, Y)
    img = sl.T[::-1]  # rows = -y (anterior at the top), cols = x
    side, px, py = _slice_geometry(vol.shape, size)[:3]
    canvas = np.zeros((side, side), np.float32)
    oy, ox = int(py), int(px)
    canvas[oy : oy + img.shape[0], ox : ox + img.shape[1]] = img
    return resize_image(canvas, size)


def mni_axial_slice(name: str, z_mm: float, size: int) -> np.ndarray:
    """``axial_slice`` of an MNI volume ("t1", "gm" or "wm")."""
    vol, aff = mni_volume(name)
    return axial_slice(vol, aff, z_mm, size)


def mni_slices(name: str, zs, size: int) -> np.ndarray:
    """``mni_axial_slice`` at each height of ``zs`` (mm), stacked: float32 (len(zs), size, size)."""
    return np.stack([mni_axial_slice(name, float(z), size) for z in zs]).astype(np.float32)


def mni_to_pixel(xyz_mm, size: int) -> np.ndarray:
    """MNI mm coordinates (M, 3) -> pixel (x, y) of ``mni_axial_slice(..., size)`` (M, 2)."""
    vol, aff = mni_volume("t1")
    xyz = np.atleast_2d(np.asarray(xyz_mm, dtype=np.float64))
    ijk = (np.linalg.inv(aff) @ np.c_[xyz, np.ones(len(xyz))].T).T[:, :3]
    side, px, py, scale = _slice_geometry(vol.shape, size)
    col = ijk[:, 0] + int(px)
    row = (vol.shape[1] - 1 - ijk[:, 1]) + int(py)
    # canvas pixel centre c maps to output (c + 0.5) / scale - 0.5 (align_corners=False)
    return np.stack([(col + 0.5) / scale - 0.5, (row + 0.5) / scale - 0.5], axis=1)


# ----------------------------------------------------------------------------- small structures


def _mm_grid(shape, aff):
    """The mm coordinates x, y, z of an axis-aligned grid, as arrays that broadcast against it ((X, 1, 1),
    (1, Y, 1), (1, 1, Z)): the same values as full grids, without their memory and time."""
    ii, jj, kk = np.ix_(*[np.arange(n) for n in shape])
    return aff[0, 0] * ii + aff[0, 3], aff[1, 1] * jj + aff[1, 3], aff[2, 2] * kk + aff[2, 3]


def ventricle_slice(z: float, size: int) -> np.ndarray:
    """Boolean mask of the lateral/third ventricles at height z (see the module docstring)."""
    t1, aff = mni_volume("t1")
    gm, _ = mni_volume("gm")
    wm, _ = mni_volume("wm")
    if "ventricles" not in _MNI_CACHE:
        csf = (t1 > 0.02) & ((1.0 - gm - wm) > 0.5)
        x, y, zz = _mm_grid(t1.shape, aff)
        box = (np.abs(x) <= 24) & (y >= -45) & (y <= 30) & (zz >= -5) & (zz <= 35)
        _MNI_CACHE["ventricles"] = (csf & box).astype(np.float32)
    return axial_slice(_MNI_CACHE["ventricles"], aff, z, size) > 0.5


def structure_volume(name: str) -> np.ndarray:
    """Float32 (0/1) volume of a small structure on the T1 template's voxel grid (``STRUCTURES``)."""
    if name not in STRUCTURES:
        raise ValueError(f"name must be one of {STRUCTURES}, got {name!r}")
    key = "structure_" + name
    if key not in _MNI_CACHE:
        t1, aff = mni_volume("t1")
        gm, _ = mni_volume("gm")
        wm, _ = mni_volume("wm")
        x, y, z = _mm_grid(t1.shape, aff)
        if name == "ventricles":
            csf = (t1 > 0.02) & ((1.0 - gm - wm) > 0.5)
            m = csf & (np.abs(x) <= 24) & (y >= -45) & (y <= 30) & (z >= -5) & (z <= 35)
        else:
            deep = (gm > 0.5) & (np.abs(x) <= 31) & (z >= -6) & (z <= 22) & (y >= -38) & (y <= 28)
            if name == "striatum":
                m = deep & (y >= -8) & (np.abs(x) >= 6)
            elif name == "thalamus":
                m = deep & (y < -8) & (np.abs(x) <= 22)
            else:
                m = (wm > 0.5) & (np.abs(x) <= 10) & (z >= 4) & (z <= 30)
        _MNI_CACHE[key] = m.astype(np.float32)
    return _MNI_CACHE[key]


def structure_slices(name: str, zs, size: int) -> np.ndarray:
    """Boolean (len(zs), size, size) masks of a structure on axial slices (as ``mni_slices``)."""
    vol = structure_volume(name)
    _, aff = mni_volume("t1")
    return np.stack([axial_slice(vol, aff, float(z), size) > 0.5 for z in zs])


def dosenbach_rois() -> list[dict]:
    """The 160 Dosenbach et al. (2010) ROI centres shipped with nilearn: name, network, x, y, z (mm)."""
    out = []
    with open(nilearn_data_dir() / "dosenbach_2010.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.append(
                {
                    "name": f"{row['name']}#{row['number']}",
                    "network": row["network"],
                    "x": float(row["x"]),
                    "y": float(row["y"]),
                    "z": float(row["z"]),
                }
            )
    return out
