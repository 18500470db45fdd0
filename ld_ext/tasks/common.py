"""Shared pieces of the downstream tasks: image loading (through the one reader,
``ld_ext.data``) and image/mask pairing, Dice, random affine + elastic warps with exact point
transport, model loading and embedding. The atomic writers of results (``atomic_write_json``,
``atomic_write_text``, ``atomic_savefig``) are those of ``ld_ext.atomic``, importable from here.

Pixel coordinates everywhere are ``(x, y)`` = (column, row) with pixel centres at integers.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as _data
from ..augment import normalize_intensity
from ..checkpoint import checkpoint_parts, load_checkpoint, model_from_checkpoint
from ..data import readers as _readers
from ..normalization import normalize_embeddings
from ..atomic import atomic_savefig, atomic_write_json, atomic_write_text  # re-exported for the task modules
from ..data import IMAGE_EXTENSIONS, file_stem, scale_intensity  # re-exported: one definition, in ld_ext.data

logger = logging.getLogger("ld_ext.tasks")

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIXES",
    "file_stem",
    "add_size_argument",
    "list_images",
    "load_image",
    "load_mask",
    "scale_intensity",
    "pair_images_masks",
    "load_pairs",
    "resize_image",
    "dice",
    "soft_dice_loss",
    "Warp",
    "random_warp",
    "warp_image",
    "model_input",
    "load_ld_model",
    "load_ld_model_and_size",
    "checkpoint_train_size",
    "train_size_of",
    "task_size",
    "describe_part",
    "embed",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_savefig",
    "check_positive_int",
    "check_dir",
    "split_indices",
]

MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_gt")


# ----------------------------------------------------------------------------- the split of a labelled set


def split_indices(
    n: int,
    shots: int,
    seeds: int,
    test_fraction: float = 0.5,
    has_foreground=None,
    pool_words: str = "labelled pairs with a non-empty mask remain",
):
    """(test indices, [train indices per seed]): the split of the segmentation transfer and the
    linear probe (module docstrings of ``ld_ext.tasks.segmentation`` and ``ld_ext.tasks.probe``).

    The ``n`` pairs are shuffled once (seed 0) and ``test_fraction`` of them are held out; seed
    ``s`` then draws its ``shots`` training pairs (``1000 + s``) from the rest.

    With ``has_foreground`` (a boolean per pair), the training pairs are drawn only among the
    non-held-out pairs whose mask is not empty (``pool_words`` says what that pool is in the error
    raised when it is too small; ``{rest}`` in it stands for the number of non-held-out pairs).
    At least one pair is held out and, with two or more, at least one is left to train on.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(0).permutation(n)
    n_test = max(1, min(n - 1, int(round(n * test_fraction))))
    test, pool = np.sort(order[:n_test]), order[n_test:]
    what = "labelled pairs remain"
    if has_foreground is not None:
        fg = np.asarray(has_foreground, dtype=bool)
        if fg.shape != (n,):
            raise ValueError(f"has_foreground must have one entry per pair ({n}), got shape {fg.shape}")
        what = pool_words.format(rest=len(pool))
        pool = pool[fg[pool]]
    if shots > len(pool):
        raise ValueError(
            f"shots={shots} but only {len(pool)} {what} after holding out {n_test} of {n} "
            f"for testing; give more pairs, fewer shots or a smaller test fraction"
        )
    trains = [np.sort(np.random.default_rng(1000 + s).choice(pool, size=shots, replace=False)) for s in range(seeds)]
    return test, trains


# ----------------------------------------------------------------------------- argument checks


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dir(name: str, path) -> Path:
    if path is None:
        raise ValueError(f"{name} must be a directory, got None")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{name} must be an existing directory, got {str(path)!r}")
    return p


# ----------------------------------------------------------------------------- image I/O


def add_size_argument(parser) -> None:
    """``--size`` of the commands that read images + masks (probe, finetune): the checkpoint's
    training size by default (``task_size``)."""
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize images and masks to SIZE x SIZE (default: the size the checkpoint was pre-trained at, when it "
        "records it; else the images' own size)",
    )


def list_images(folder, name: str = "images", exclude=()) -> list[Path]:
    """Sorted image files under ``folder``, searched recursively with the pre-training scan
    (``ld_ext.data.scan_image_files``: extensions in ``IMAGE_EXTENSIONS``, dot-names ignored,
    entries that are not regular files skipped unopened with a warning, folders marked as ld_ext
    outputs and the paths in ``exclude`` skipped); none -> ValueError."""
    d = check_dir(name, folder)
    try:
        scan = _data.scan_image_files(d, name=name, exclude=list(exclude))
    except ValueError as exc:
        if "no supported image files" in str(exc):
            raise ValueError(
                f"{name}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}, searched recursively"
            ) from exc
        raise
    _readers.warn_not_regular(scan, stacklevel=3)
    return scan.files


def load_image(path) -> np.ndarray:
    """A 2-D float32 array from any file the pre-training reader takes (``ld_ext.data.load_arrays``):
    PNG/JPEG/TIFF/BMP (8/16-bit, float; RGB -> grey by luma), DICOM, NIfTI, .npy.

    The file must hold exactly one 2-D image (a NIfTI volume of one slice is fine; other volumes
    and multi-frame files are refused: give 2-D slices). NaN/Inf pixels are an error.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"image file not found: {str(path)!r}")
    try:
        arrays = _data.load_arrays(p, nifti_axes=(2,), min_foreground=0.0)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if p.name in msg else f"could not read image {str(path)!r}: {msg}") from exc
    except Exception as exc:  # unreadable / corrupt file, missing reader package
        raise ValueError(f"could not read image {str(path)!r}: {exc}") from exc
    if len(arrays) != 1:
        raise ValueError(f"image {str(path)!r} must be 2-D (a slice), but it holds {len(arrays)} 2-D images")
    arr = arrays[0][1]
    if arr.ndim == 3:
        arr = _data.to_channels(arr, 1)[0]
    if not np.isfinite(arr).all():
        raise ValueError(f"image {str(path)!r} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_mask(path) -> np.ndarray:
    """A boolean 2-D mask: nonzero pixels are foreground (for 8-bit images: > 127)."""
    arr = load_image(path)
    if arr.max() > 1.0 and Path(path).name.lower().endswith(_data.RASTER_EXTENSIONS):
        return arr > 127
    return arr > 0.5 if arr.max() <= 1.0 else arr > 0


def _pair_key(path: Path, root: Path) -> str:
    rel = Path(path).relative_to(root)
    return (rel.parent / file_stem(rel)).as_posix()


def pair_images_masks(images_dir, masks_dir) -> list[tuple[Path, Path]]:
    """Pair each image with its mask (both folders searched recursively).

    Rule: the mask of ``images/SUB/NAME.ext`` is the file ``masks/SUB/NAME<suffix>.<any ext>``
    where ``SUB`` is the same sub-folder path (empty for flat folders) and ``<suffix>`` is, in this
    order of preference, nothing, ``_mask``, ``_seg``, ``_label`` or ``_gt``. An image without a
    mask is an error; masks without an image are ignored.
    """
    images = list_images(images_dir, "images")
    masks = list_images(masks_dir, "masks")
    iroot, mroot = Path(images_dir).absolute(), Path(masks_dir).absolute()
    by_key: dict[str, Path] = {}
    for m in masks:
        by_key.setdefault(_pair_key(m, mroot), m)
    pairs, missing = [], []
    for im in images:
        key = _pair_key(im, iroot)
        found = next((by_key[key + s] for s in MASK_SUFFIXES if key + s in by_key), None)
        if found is None:
            missing.append(Path(im).relative_to(iroot).as_posix())
        else:
            pairs.append((im, found))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"masks: no mask found for {len(missing)} image(s): {', '.join(missing[:5])}{more}; "
            f"expected a file in {str(masks_dir)!r} (same sub-folder) named like the image, optionally with one of "
            f"the suffixes {', '.join(s for s in MASK_SUFFIXES if s)}"
        )
    return pairs


def resize_image(img: np.ndarray, size: int | tuple[int, int], mode: str = "area") -> np.ndarray:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if mode == "area":
        out = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
    else:
        out = F.interpolate(t, size=hw, mode=mode)
    return out[0, 0].numpy()


def load_pairs(pairs: Sequence[tuple[Path, Path]], size: int | None = None):
    """Load (image, mask) pairs: images scaled to [0, 1], masks boolean.

    Image and mask must have the same size (else ValueError naming both files). With ``size``
    both are resized to ``size x size`` (masks by area then > 0.5).
    """
    images, masks = [], []
    for ip, mp in pairs:
        img = load_image(ip)
        msk = load_mask(mp)
        if img.shape != msk.shape:
            raise ValueError(
                f"image {ip.name} has size {img.shape[1]}x{img.shape[0]} but its mask {mp.name} has "
                f"size {msk.shape[1]}x{msk.shape[0]}; they must match"
            )
        img = scale_intensity(img)
        if size is not None:
            img = resize_image(img, size)
            msk = resize_image(msk.astype(np.float32), size) > 0.5
        images.append(img)
        masks.append(msk)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass --size to resize them to one size")
    return np.stack(images), np.stack(masks)


# ----------------------------------------------------------------------------- metrics


def dice(pred, target) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    denom = p.sum() + t.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-2 * TP / (|G| + |P| + 1) (docs/method.md section 8), sums taken over the whole batch.

    Pooling over the batch (rather than averaging per-image values) matters for structures that
    are absent from some images: per image, an empty ground truth gives a constant 0 whatever the
    prediction, so false positives there would never be penalised.
    """
    p = prob.reshape(-1)
    g = target.reshape(-1).to(p.dtype)
    tp = (p * g).sum()
    return -2.0 * tp / (g.sum() + p.sum() + 1.0)


# ----------------------------------------------------------------------------- warps


@dataclass
class Warp:
    """A backward map out -> in: ``q = c + M (p - c) + t + d(p)`` for output pixel ``p``.

    ``grid`` (1, H, W, 2) is its ``grid_sample`` form (align_corners=False); ``displacement``
    (2, H, W) is the elastic part d on the pixel grid (bilinear between pixel centres).
    """

    matrix: np.ndarray  # (2, 2)
    shift: np.ndarray  # (2,)
    displacement: np.ndarray  # (2, H, W), (dx, dy)
    shape: tuple[int, int]

    @property
    def centre(self) -> np.ndarray:
        h, w = self.shape
        return np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    def backward(self, p: np.ndarray) -> np.ndarray:
        """Input location of output points ``p`` (M, 2)."""
        p = np.atleast_2d(np.asarray(p, dtype=np.float64))
        c = self.centre
        return c + (p - c) @ self.matrix.T + self.shift + self._disp(p)

    def _disp(self, p: np.ndarray) -> np.ndarray:
        h, w = self.shape
        x = np.clip(p[:, 0], 0, w - 1)
        y = np.clip(p[:, 1], 0, h - 1)
        x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
        y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
        fx, fy = (x - x0)[:, None], (y - y0)[:, None]
        d = self.displacement.transpose(1, 2, 0)  # (H, W, 2)
        return (
            d[y0, x0] * (1 - fx) * (1 - fy)
            + d[y0, x0 + 1] * fx * (1 - fy)
            + d[y0 + 1, x0] * (1 - fx) * fy
            + d[y0 + 1, x0 + 1] * fx * fy
        )

    def forward_points(self, q: np.ndarray, iters: int = 100) -> np.ndarray:
        """Where input points ``q`` (M, 2) land in the output: solves ``backward(p) = q`` by
        fixed-point iteration (the elastic part is small and smooth, so it contracts)."""
        q = np.atleast_2d(np.asarray(q, dtype=np.float64))
        c = self.centre
        minv = np.linalg.inv(self.matrix)
        p = c + (q - self.shift - c) @ minv.T
        for _ in range(iters):
            p = c + (q - self.shift - self._disp(p) - c) @ minv.T
        return p

    @property
    def grid(self) -> torch.Tensor:
        h, w = self.shape
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        p = np.stack([xs.ravel(), ys.ravel()], 1)
        c = self.centre
        q = c + (p - c) @ self.matrix.T + self.shift + self.displacement.reshape(2, -1).T
        gx = (2 * q[:, 0] + 1) / w - 1
        gy = (2 * q[:, 1] + 1) / h - 1
        return torch.from_numpy(np.stack([gx, gy], 1).reshape(1, h, w, 2)).float()


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape`` scaled to peak magnitude 1 (elastic fields, bias fields)."""
    from scipy.ndimage import (
        gaussian_filter,
    )  # lazy: scipy.ndimage is slow to import and only the elastic warp needs it

    n = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return n / (np.abs(n).max() + 1e-12)


def random_warp(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 4.0,
    max_shear: float = 0.05,
    elastic_px: float = 2.0,
    elastic_sigma: float = 8.0,
) -> Warp:
    """A random affine (rotation, anisotropic scale, shear, shift) plus a smooth elastic field
    of peak amplitude ``elastic_px`` pixels."""
    h, w = shape
    th = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    sx, sy = rng.uniform(*scale_range, size=2)
    sh = rng.uniform(-max_shear, max_shear)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([sx, sy])
    t = rng.uniform(-max_shift, max_shift, size=2)
    disp = np.stack([smooth_noise(rng, (h, w), elastic_sigma), smooth_noise(rng, (h, w), elastic_sigma)])
    disp *= elastic_px
    return Warp(matrix=m, shift=t, displacement=disp, shape=(h, w))


def warp_image(img: np.ndarray, warp: Warp, mode: str = "bilinear") -> np.ndarray:
    """Resample ``img`` (H, W) through ``warp`` (zeros outside)."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.grid_sample(t, warp.grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()


# ----------------------------------------------------------------------------- model


def model_input(images) -> torch.Tensor:
    """(B, 1, H, W) network input from images in [0, 1] (array (B,H,W)/(H,W) or tensor), with
    the same fixed intensity normalisation as pre-training (``ld_ext.augment.normalize_intensity``)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    x = x.float()
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 3:
        x = x[:, None]
    return normalize_intensity(x)


def load_ld_model(path, part: str = "representation"):
    """The LDNet of a checkpoint (weights_only load, clear errors), and one log line saying which
    network of the file the task reads.

    ``part``: ``"representation"`` (segmentation, probe, shape-guided: the network of stages 1-2)
    or ``"landmark"`` (``ld-ext landmark``: the network after the centre-sensitive term of stage 3,
    when the file has one). See ``ld_ext.checkpoint.load_model``.
    """
    return load_ld_model_and_size(path, part)[0]


def load_ld_model_and_size(path, part: str = "representation"):
    """``load_ld_model`` and ``train_size_of`` of the same file, read once: (LDNet, size or None)."""
    ckpt = load_checkpoint(path, map_location="cpu")  # read once: the network and what the file holds
    model = model_from_checkpoint(ckpt, f"checkpoint {path}", part)
    logger.info("%s: %s", path, describe_part(checkpoint_parts(ckpt), part))
    return model, train_size_of(ckpt)


def require_2d_network(model, checkpoint, command: str) -> None:
    """One clear error for a 3-D network (``ld-ext pretrain --dims 3``) given to a task that works on
    2-D images only (``ld-ext landmark``, ``ld-ext shape-guided``); without it the first forward
    failed on the input's shape, naming neither the checkpoint nor the cause."""
    if int(model.config.get("spatial_dims", 2)) != 2:
        raise ValueError(
            f"checkpoint {checkpoint} is a 3-D network (pre-trained on volumes, --dims 3); {command} works on "
            "2-D images only: give it the checkpoint of a 2-D run"
        )


def train_size_of(ckpt) -> int | None:
    """The image side a checkpoint's network was pre-trained at: ``train_config["size"]`` (written by
    ``ld-ext pretrain`` into model.pt and its stage files), or None when the file does not record it
    (a plain state dict, a network saved by hand, a file of an older ld_ext)."""
    tc = ckpt.get("train_config") if isinstance(ckpt, dict) else None
    size = tc.get("size") if isinstance(tc, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1 << 16:
        return None
    return size


def checkpoint_train_size(path) -> int | None:
    """``train_size_of`` the checkpoint file ``path`` (read with the checks of ``load_checkpoint``)."""
    return train_size_of(load_checkpoint(path, map_location="cpu"))


def task_size(size: int | None, trained: int | None, checkpoint, default: int | None = None) -> int | None:
    """The image side a task resizes its images to, given ``--size`` (``size``, None if not given)
    and the side the network of ``checkpoint`` was pre-trained at (``trained``, None if unknown).

    No --size: the training side when known (one log line says so), else ``default`` (None: the
    images' own size). A --size other than the training side is used as given, with a warning that
    names both: the network then sees every structure at another scale than it learnt."""
    if size is None:
        if trained is not None:
            logger.info(
                "--size: images resized to %dx%d, the size %s was pre-trained at (give --size to change it)",
                trained,
                trained,
                checkpoint,
            )
            return trained
        return default
    if trained is not None and size != trained:
        warnings.warn(
            f"--size {size} differs from the size {checkpoint} was pre-trained at ({trained}): the network sees "
            f"structures at {size / trained:.2g}x the scale it learnt; leave --size out to use {trained}",
            stacklevel=2,
        )
    return size


def describe_part(has: dict, part: str) -> str:
    """One sentence on which network of a checkpoint a task reads (``has``: ``checkpoint_parts``)."""
    if has["legacy_stage3"]:
        return (
            "its weights include the centre-sensitive landmark term of stage 3 (a file of an older ld_ext, or "
            "stage3.pt); "
            + (
                "the landmark task reads them as they are"
                if part == "landmark"
                else "this task reads them as they are; the representation before stage 3 is stage2.pt of the same run"
            )
        )
    if part == "landmark":
        return (
            "reading the landmark network (after stage 3, the centre-sensitive term)"
            if has["landmark"]
            else "reading the representation network (the file has no stage-3 landmark network)"
        )
    return "reading the representation network (stages 1-2" + (
        "; the file's stage-3 landmark network is for ld-ext landmark)" if has["landmark"] else ")"
    )


@torch.no_grad()
def embed(model, images, batch: int = 8):
    """Unit pixel embeddings e (B, D, H, W) and raw clustering logits s (or None) of images in [0, 1]."""
    model.eval()
    x = model_input(images)
    es, ss = [], []
    for i in range(0, x.shape[0], batch):
        z, s = model(x[i : i + batch])
        es.append(normalize_embeddings(z))
        ss.append(s)
    e = torch.cat(es)
    s = torch.cat(ss) if ss[0] is not None else None
    return e, s


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
