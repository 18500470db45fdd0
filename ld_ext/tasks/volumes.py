"""The 3-D side of ``ld-ext probe`` and ``ld-ext finetune``: volumes and label volumes in, sliding-window
inference over whole volumes, 3-D Dice, and the random patches fine-tuning trains on.

A checkpoint says whether its network is 2-D or 3-D (``model.config["spatial_dims"]``); the tasks take
folders of volumes (NIfTI, DICOM series, 3-D .npy: ``ld_ext.data.volumes``) with a 3-D network and
folders of 2-D images with a 2-D one, and one of them with the other's network is one error naming both
(``check_images_match``).

Pairing: the label volume of ``images/SUB/NAME.nii.gz`` is the volume of ``labels/SUB/`` named ``NAME``
(or ``NAME_mask`` / ``_seg`` / ``_label`` / ``_gt``), any volume format; a DICOM series is named by its
folder. Label volumes are read without intensity normalisation and resampled by nearest neighbour onto
the image's grid (``read_volume(..., label=True)``), so integer label maps keep their values: with
``--labels 1 2`` each value is one structure, without it every nonzero voxel is foreground.

Sliding window (``sliding_window``): windows of the checkpoint's training patch size, 50 % overlap, the
last window of each axis flush with the volume's end; each voxel's output is the average of the windows
that cover it, weighted by a Gaussian centred on each window (sigma = 1/8 of the window, so the centre
of a window counts more than its rim) or uniformly. A volume smaller than the window along an axis is
padded with zeros (intensity 0, as outside a patch of the pre-training cache) and the output cropped
back. Only one batch of windows goes through the network at a time.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_checkpoint
from ..data import volumes as _volumes
from ..data.readers import NIFTI_EXTENSIONS, NUMPY_EXTENSIONS
from ..viz import new_figure
from . import common

logger = logging.getLogger("ld_ext.tasks")

__all__ = [
    "DEFAULT_OVERLAP",
    "WINDOW_WEIGHTS",
    "spatial_dims_of",
    "file_volume_shape",
    "check_images_match",
    "check_3d_options",
    "check_task_inputs",
    "add_volume_arguments",
    "volume_window",
    "recorded_reading",
    "reading_options",
    "reading_record",
    "pair_volumes",
    "load_volume_pairs",
    "structure_masks",
    "window_size",
    "window_starts",
    "window_weight",
    "sliding_window",
    "predict_volume",
    "dice_per_volume",
    "pooled_dice",
    "PatchSampler",
    "shown_slice",
    "plot_volume_overlays",
]

DEFAULT_OVERLAP = 0.5
WINDOW_WEIGHTS = ("gaussian", "uniform")
GAUSSIAN_SIGMA = 0.125  # of the window's edge


# ----------------------------------------------------------------------------- 2-D or 3-D


def spatial_dims_of(model) -> int:
    """2 for a network on images, 3 for one on volumes (``model.config["spatial_dims"]``; 2 when absent)."""
    return int(model.config.get("spatial_dims", 2))


def _header_shape(path) -> tuple[int, ...] | None:
    """The array shape of a NIfTI or .npy file from its header (extra axes of length 1 dropped); None for
    other files and unreadable ones (the reader says why when the task reads them)."""
    p = Path(path)
    low = p.name.lower()
    try:
        if low.endswith(NIFTI_EXTENSIONS):
            import nibabel as nib  # lazy: optional package

            shape = tuple(int(s) for s in nib.load(str(p)).shape)
        elif low.endswith(NUMPY_EXTENSIONS):
            shape = tuple(int(s) for s in np.load(str(p), mmap_mode="r", allow_pickle=False).shape)
        else:
            return None
    except Exception:
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def file_volume_shape(path) -> tuple[int, ...] | None:
    """The shape of a NIfTI or .npy file that holds a volume (three axes longer than 1), read from its
    header without loading it; None for any other file (2-D images, one-slice NIfTI, RGB .npy)."""
    shape = _header_shape(path)
    if shape is None or len(shape) != 3 or min(shape) < 2:
        return None
    if Path(path).name.lower().endswith(NUMPY_EXTENSIONS) and shape[2] == 3:
        return None  # an RGB image for the 2-D reader
    return shape


def _mismatch(checkpoint, dims: int, images, example: str) -> ValueError:
    if dims == 3:
        return ValueError(
            f"checkpoint {checkpoint} is a 3-D network (pre-trained on volumes) but --images {images} holds 2-D "
            f"images ({example}); give folders of volumes (NIfTI, DICOM series, 3-D .npy) or a 2-D checkpoint"
        )
    return ValueError(
        f"checkpoint {checkpoint} is a 2-D network (pre-trained on images) but --images {images} holds 3-D "
        f"volumes ({example}); give folders of 2-D images or a 3-D checkpoint (ld-ext pretrain --dims 3)"
    )


def check_images_match(dims: int, images, checkpoint) -> None:
    """One error naming the checkpoint and the folder when a 2-D network is given volumes or a 3-D one
    2-D images (``--images`` only: label volumes are checked against their images when read)."""
    if dims == 2:
        for f in common.list_images(images, "images"):
            shape = file_volume_shape(f)
            if shape is not None:
                raise _mismatch(checkpoint, 2, images, f"{f.name}: {'x'.join(map(str, shape))}")
        return
    try:
        found = _volumes.list_volume_files([common.check_dir("images", images)])
    except ValueError:
        found = []
    if not found:
        flat = common.list_images(images, "images")  # no 2-D images either: its error says what is expected
        raise _mismatch(checkpoint, 3, images, flat[0].name)
    for f in found:
        shape = _header_shape(f)
        if shape is not None and (len(shape) < 3 or min(shape) < 2):
            raise _mismatch(checkpoint, 3, images, f"{Path(f).name}: {'x'.join(map(str, shape))}")


def check_3d_options(args, dims: int, checkpoint) -> None:
    """--labels, --spacing and --window are options of volumes: refused by name with a 2-D checkpoint."""
    if dims == 3:
        return
    for flag in ("labels", "spacing", "window"):
        if getattr(args, flag, None) is not None:
            raise ValueError(
                f"--{flag} applies to volumes (a 3-D checkpoint); checkpoint {checkpoint} is a 2-D network"
            )


def check_task_inputs(args, model) -> int:
    """The checks of ``ld-ext probe`` / ``ld-ext finetune`` that depend on the checkpoint's kind
    (``check_3d_options``, ``check_images_match``); returns its spatial dims (2 or 3)."""
    dims = spatial_dims_of(model)
    check_3d_options(args, dims, args.checkpoint)
    check_images_match(dims, args.images, args.checkpoint)
    return dims


# ----------------------------------------------------------------------------- the options of volumes


def add_volume_arguments(parser) -> None:
    """--labels, --spacing and --window of probe and finetune (3-D checkpoints only)."""
    g = parser.add_argument_group(
        "volumes (3-D checkpoints)",
        "With a checkpoint of ld-ext pretrain --dims 3, --images is a folder of volumes (NIfTI, DICOM series, "
        "3-D .npy) and the mask folder one of label volumes (paired by name); --size is then the edge of the "
        "sliding window (and of the fine-tuning patches), by default the patch size of pre-training.",
    )
    g.add_argument(
        "--labels",
        type=int,
        nargs="+",
        default=None,
        metavar="VALUE",
        help="label values of integer label maps, one structure each (default: every nonzero voxel is foreground)",
    )
    g.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="resample volumes to this voxel spacing in mm (default: as pre-training read them when the checkpoint "
        "records it, else keep)",
    )
    g.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="intensity window (CT, e.g. -1000 400) instead of percentile normalisation (default: as pre-training, "
        "when the checkpoint records it)",
    )


def volume_window(size: int | None, trained: int | None, checkpoint) -> tuple[int, int, int]:
    """The sliding window's edge on volumes: ``--size`` when given, else the patch edge the checkpoint was
    pre-trained at; neither is an error naming the checkpoint."""
    if size is None and trained is None:
        raise ValueError(
            f"--size: checkpoint {checkpoint} does not record the patch size it was pre-trained at; give --size "
            "(the edge of the sliding window, e.g. the --size of ld-ext pretrain --dims 3)"
        )
    if size is None:
        logger.info("--size: sliding windows of %d^3, the patch size %s was pre-trained at", trained, checkpoint)
    return window_size(trained if size is None else size)


def recorded_reading(checkpoint) -> dict:
    """How ``ld-ext pretrain --dims 3`` read the volumes of ``checkpoint``: the ``spacing``, ``window`` and
    ``percentiles`` of its train config that are set (a file that does not record them: none)."""
    tc = load_checkpoint(checkpoint).get("train_config")
    if not isinstance(tc, dict):
        return {}
    out = {}
    for key, n in (("spacing", 3), ("window", 2), ("percentiles", 2)):
        v = tc.get(key)
        if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float)) for x in v):
            out[key] = tuple(float(x) for x in v)
    return out


def reading_options(args, recorded: dict | None = None) -> dict:
    """``spacing``, ``window`` (and ``percentiles``, when recorded) for ``read_volume``: the command line's,
    else those the checkpoint's pre-training recorded (``recorded``: ``recorded_reading``), else None (keep
    the spacing; percentile normalisation)."""
    recorded = recorded or {}
    out = {"percentiles": recorded["percentiles"]} if "percentiles" in recorded else {}
    for key in ("spacing", "window"):
        v = getattr(args, key, None)
        v = recorded.get(key) if v is None else v
        if v is not None:
            v = tuple(float(x) for x in v)
            if not all(math.isfinite(x) for x in v) or (key == "spacing" and min(v) <= 0):
                raise ValueError(f"--{key} must be finite numbers{' > 0' if key == 'spacing' else ''}, got {list(v)}")
            if key == "window" and not v[0] < v[1]:
                raise ValueError(f"--window must be LOW HIGH with LOW < HIGH, got {list(v)}")
        if v is not None and getattr(args, key, None) is None:
            logger.info("--%s: %s, as pre-training read the volumes", key, " ".join(f"{x:g}" for x in v))
        out[key] = v
    return out


def reading_record(window, reading: dict) -> dict:
    """What results.json records of how the volumes were read and windowed."""
    return {
        "dims": 3,
        "sliding_window": list(window),
        "spacing": None if reading["spacing"] is None else list(reading["spacing"]),
        "intensity_window": None if reading["window"] is None else list(reading["window"]),
        "percentiles": list(reading["percentiles"]) if "percentiles" in reading else None,
    }


# ----------------------------------------------------------------------------- volumes and label volumes


def _pair_key(path: Path, root: Path) -> str:
    rel = Path(path).absolute().relative_to(root)
    name = rel.name if Path(path).is_dir() else common.file_stem(rel)
    return (rel.parent / name).as_posix()


def pair_volumes(images_dir, labels_dir, flag: str = "--masks") -> list[tuple[Path, Path]]:
    """(volume, label volume) pairs, paired by name as in the module docstring; a volume without its
    label volume is an error naming it (label volumes without a volume are ignored)."""
    iroot = common.check_dir("images", images_dir).absolute()
    lroot = common.check_dir(flag, labels_dir).absolute()
    images = _volumes.list_volume_files([iroot])
    labels = _volumes.list_volume_files([lroot])
    by_key: dict[str, Path] = {}
    for lp in labels:
        by_key.setdefault(_pair_key(lp, lroot), lp)
    pairs, missing = [], []
    for im in images:
        key = _pair_key(im, iroot)
        found = next((by_key[key + s] for s in common.MASK_SUFFIXES if key + s in by_key), None)
        if found is None:
            missing.append(Path(im).absolute().relative_to(iroot).as_posix())
        else:
            pairs.append((Path(im), Path(found)))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"{flag}: no label volume found for {len(missing)} volume(s): {', '.join(missing[:5])}{more}; expected "
            f"a volume in {str(labels_dir)!r} (same sub-folder) named like it, optionally with one of the suffixes "
            f"{', '.join(s for s in common.MASK_SUFFIXES if s)}"
        )
    return pairs


def load_volume_pairs(pairs, *, spacing=None, window=None, percentiles=(0.5, 99.5), checkpoint=None, images=None):
    """(volumes, label volumes): float32 volumes as ``read_volume`` gives them (intensity normalised by
    ``window`` or ``percentiles``, resampled to ``spacing``) and
    their label volumes (integer values kept) on the same grid; a label volume whose shape differs from its
    volume's is an error naming both, a volume with an axis of one voxel (a 2-D image) one naming the
    checkpoint (``checkpoint``, ``images``: for that message)."""
    vols, labs = [], []
    for ip, lp in pairs:
        v = _volumes.read_volume(ip, spacing=spacing, window=window, percentiles=percentiles)
        if min(v.array.shape) < 2:
            raise _mismatch(checkpoint, 3, images, f"{ip.name}: {'x'.join(map(str, v.array.shape))}")
        lab = _volumes.read_volume(lp, spacing=spacing, label=True)
        if lab.array.shape != v.array.shape:
            raise ValueError(
                f"label volume {lp.name} has shape {'x'.join(map(str, lab.array.shape))} but its volume {ip.name} "
                f"has {'x'.join(map(str, v.array.shape))} (after reorientation and resampling); they must match"
            )
        if not np.isfinite(v.array).all():
            raise ValueError(f"volume {ip.name} contains NaN or infinite values")
        vols.append(np.ascontiguousarray(v.array, dtype=np.float32))
        labs.append(np.asarray(lab.array))
    return vols, labs


def structure_masks(labels: Sequence[np.ndarray], values: Sequence[int] | None, name: str):
    """[(structure name, [bool mask per volume])]: one per label value of ``values`` (``name=value``),
    or one, ``name``, of the nonzero voxels when ``values`` is None. A value no label volume holds is an
    error naming it and the values found."""
    if values is None:
        return [(name, [np.asarray(lab) != 0 for lab in labels])]
    out = []
    for v in values:
        masks = [np.asarray(lab) == v for lab in labels]
        if not any(m.any() for m in masks):
            found = sorted({int(x) for lab in labels for x in np.unique(lab)})
            shown = ", ".join(map(str, found[:20])) + (" ..." if len(found) > 20 else "")
            raise ValueError(f"--labels {v}: no label volume of {name!r} holds the value {v} (values found: {shown})")
        out.append((f"{name}={v}", masks))
    return out


# ----------------------------------------------------------------------------- sliding window


def window_size(size, dims: int = 3) -> tuple[int, ...]:
    """A window edge (int) or one per axis, as a tuple of ``dims`` ints >= 16."""
    sizes = (size,) * dims if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else tuple(size)
    if len(sizes) != dims:
        raise ValueError(f"window must have {dims} entries, got {sizes}")
    return tuple(common.check_positive_int("window", s, 16) for s in sizes)


def window_starts(length: int, win: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Window starts along an axis of ``length`` voxels: a stride of ``win * (1 - overlap)`` (at least
    1), the last window flush with the end; ``[0]`` when one window covers the axis."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= win:
        return [0]
    step = max(1, int(win * (1.0 - overlap)))
    n = math.ceil((length - win) / step) + 1
    return sorted({min(i * step, length - win) for i in range(n)})


def window_weight(window: Sequence[int], mode: str = "gaussian") -> torch.Tensor:
    """The weight of each voxel of a window (float32, shape ``window``): a separable Gaussian centred on
    the window (sigma = ``GAUSSIAN_SIGMA`` of its edge, peak 1), or ones."""
    if mode not in WINDOW_WEIGHTS:
        raise ValueError(f"weight must be one of {WINDOW_WEIGHTS}, got {mode!r}")
    w = torch.ones((), dtype=torch.float32)
    for n in window:
        if mode == "uniform":
            g = torch.ones(n, dtype=torch.float32)
        else:
            x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
            g = torch.exp(-0.5 * (x / (GAUSSIAN_SIGMA * n)) ** 2).float()
        w = w[..., None] * g
    return w


@torch.no_grad()
def sliding_window(
    fn: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    window,
    *,
    overlap: float = DEFAULT_OVERLAP,
    weight: str = "gaussian",
    batch: int = 1,
) -> torch.Tensor:
    """``fn`` over a whole volume by windows (module docstring): ``volume`` (C, X, Y, Z), ``fn`` maps a
    batch of windows (B, C, wx, wy, wz) to outputs (B, C', wx, wy, wz); returns (C', X, Y, Z) float32."""
    if not isinstance(volume, torch.Tensor) or volume.dim() != 4:
        raise ValueError(f"volume must be a (C, X, Y, Z) tensor, got {getattr(volume, 'shape', type(volume))}")
    win = window_size(window)
    batch = common.check_positive_int("batch", batch)
    shape = tuple(volume.shape[1:])
    pad = [max(0, w - s) for w, s in zip(win, shape)]
    if any(pad):
        volume = F.pad(volume, [p for d in reversed(pad) for p in (0, d)])
    full = tuple(volume.shape[1:])
    axes = [window_starts(n, w, overlap) for n, w in zip(full, win)]
    starts = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    wt = window_weight(win, weight)
    out = norm = None
    for i in range(0, len(starts), batch):
        chunk = starts[i : i + batch]
        x = torch.stack([volume[:, a : a + win[0], b : b + win[1], c : c + win[2]] for a, b, c in chunk])
        y = fn(x).float()
        if y.dim() != 5 or y.shape[0] != len(chunk) or tuple(y.shape[2:]) != win:
            want = ", ".join(map(str, win))
            raise ValueError(f"fn must return (B, C, {want}) for a batch of windows, got {tuple(y.shape)}")
        if out is None:
            out = torch.zeros((y.shape[1],) + full, dtype=torch.float32)
            norm = torch.zeros(full, dtype=torch.float32)
        for (a, b, c), yi in zip(chunk, y):
            out[:, a : a + win[0], b : b + win[1], c : c + win[2]] += yi * wt
            norm[a : a + win[0], b : b + win[1], c : c + win[2]] += wt
    out /= norm
    return out[:, : shape[0], : shape[1], : shape[2]].contiguous()


@torch.no_grad()
def predict_volume(net, volume: np.ndarray, window, *, weight: str = "gaussian") -> np.ndarray:
    """Foreground probabilities (X, Y, Z) of a segmentation network (network input -> 1-channel logits) on
    a whole volume in [0, 1]: logits averaged over sliding windows, then the sigmoid."""
    net.eval()
    v = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None]
    logits = sliding_window(lambda x: net(common.model_input(x)), v, window, weight=weight)
    return torch.sigmoid(logits[0]).numpy()


# ----------------------------------------------------------------------------- 3-D Dice


def dice_per_volume(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Mean Dice over the volumes whose mask is not empty (NaN when none is)."""
    if len(preds) != len(masks):
        raise ValueError(f"preds and masks must be as many, got {len(preds)} and {len(masks)}")
    vals = [common.dice(p, m) for p, m in zip(preds, masks) if np.asarray(m).any()]
    return float(np.mean(vals)) if vals else float("nan")


def pooled_dice(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """One Dice over every voxel of every volume (volumes without the structure count through their false
    positives); 1.0 when prediction and truth are empty everywhere."""
    if len(preds) != len(masks):
        raise ValueError(f"preds and masks must be as many, got {len(preds)} and {len(masks)}")
    tp = sp = sm = 0
    for p, m in zip(preds, masks):
        p, m = np.asarray(p, dtype=bool), np.asarray(m, dtype=bool)
        if p.shape != m.shape:
            raise ValueError(f"pred and mask must have the same shape, got {p.shape} and {m.shape}")
        tp += int(np.logical_and(p, m).sum())
        sp += int(p.sum())
        sm += int(m.sum())
    return 1.0 if sp + sm == 0 else 2.0 * tp / (sp + sm)


# ----------------------------------------------------------------------------- training patches


class PatchSampler:
    """Random training patches of ``size`` (3 ints) from volumes and their masks, for fine-tuning.

    ``sampler(g)`` -> (x (B, 1, *size) network input, y (B, 1, *size) float masks): each patch is, with
    probability ``fg_fraction``, placed so that it holds a random foreground voxel (anywhere in the
    patch), else anywhere in the volume; parts outside the volume are 0; then flipped along each axis
    with probability 1/2 (image and mask alike). ``fixed(g, n)`` draws ``n`` patches without flips, as
    numpy arrays (x in [0, 1] intensities, masks bool), for the head's linear-probe start: the volumes in
    turn, each patch holding foreground where the volume has some.
    """

    def __init__(self, volumes, masks, size, batch: int, fg_fraction: float = 0.5) -> None:
        if len(volumes) != len(masks) or not volumes:
            raise ValueError(f"need as many masks as volumes (at least one), got {len(volumes)} and {len(masks)}")
        self.size = window_size(size)
        self.batch = common.check_positive_int("batch", batch)
        self.fg_fraction = float(fg_fraction)
        self.volumes = [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in volumes]
        self.masks = [torch.from_numpy(np.ascontiguousarray(m, dtype=bool)) for m in masks]
        self.fg = [torch.nonzero(m) for m in self.masks]

    def _start(self, i: int, g: torch.Generator, fg_fraction: float) -> list[int]:
        shape = self.masks[i].shape
        fg = self.fg[i]
        if len(fg) and float(torch.rand((), generator=g)) < fg_fraction:
            c = fg[int(torch.randint(len(fg), (), generator=g))]
            want = [int(c[d]) - int(torch.randint(self.size[d], (), generator=g)) for d in range(3)]
        else:
            want = [int(torch.randint(max(1, n - s + 1), (), generator=g)) for n, s in zip(shape, self.size)]
        return [min(max(w, min(0, n - s)), max(0, n - s)) for w, n, s in zip(want, shape, self.size)]

    def _crop(self, t: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=t.dtype)
        src = tuple(slice(max(0, a), min(n, a + s)) for a, n, s in zip(start, t.shape, self.size))
        dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
        out[dst] = t[src]
        return out

    def _draw(self, g: torch.Generator, i: int | None = None, fg_fraction: float | None = None):
        i = int(torch.randint(len(self.volumes), (), generator=g)) if i is None else i
        start = self._start(i, g, self.fg_fraction if fg_fraction is None else fg_fraction)
        return self._crop(self.volumes[i], start), self._crop(self.masks[i], start)

    def __call__(self, g: torch.Generator):
        xs, ys = [], []
        for _ in range(self.batch):
            x, y = self._draw(g)
            flips = [d for d in range(3) if float(torch.rand((), generator=g)) < 0.5]
            if flips:
                x, y = torch.flip(x, flips), torch.flip(y, flips)
            xs.append(x)
            ys.append(y)
        return common.model_input(torch.stack(xs)[:, None]), torch.stack(ys)[:, None].float()

    def fixed(self, g: torch.Generator, n: int):
        n = common.check_positive_int("n", n)
        pairs = [self._draw(g, k % len(self.volumes), 1.0) for k in range(n)]
        return (
            torch.stack([p[0] for p in pairs])[:, None].numpy(),
            torch.stack([p[1] for p in pairs])[:, None].numpy(),
        )


# ----------------------------------------------------------------------------- overlays


def shown_slice(masks: Sequence[np.ndarray], test) -> tuple[int, int]:
    """(volume, z) of the overlays: the held-out volume (an index of ``test``'s) with the most foreground,
    and its axial slice (last axis) with the most foreground."""
    test = [int(i) for i in test]
    j = max(test, key=lambda i: int(np.asarray(masks[i]).sum()))
    z = int(np.argmax(np.asarray(masks[j]).reshape(-1, np.asarray(masks[j]).shape[-1]).sum(0)))
    return j, z


def plot_volume_overlays(path, rows: Sequence[Sequence[dict]], title: str) -> None:
    """One panel per dict ``{"title", "where", "image", "mask", "pred"}`` (2-D axial slices, x across, y up), in
    ``rows``: the image in grey, the ground truth as a green contour, the prediction in red; each panel
    titled with its own Dice."""
    n_cols = max(len(r) for r in rows)
    fig = new_figure(figsize=(2.3 * n_cols, 2.5 * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for ri, row in enumerate(rows):
        for ci in range(n_cols):
            ax = axes[ri, ci]
            ax.axis("off")
            if ci >= len(row):
                continue
            p = row[ci]
            ax.imshow(np.asarray(p["image"]).T, cmap="gray", vmin=0, vmax=1, origin="lower")
            if np.asarray(p["mask"]).any():
                ax.contour(np.asarray(p["mask"], dtype=float).T, levels=[0.5], colors="lime", linewidths=0.7)
            pred = np.asarray(p["pred"], dtype=bool).T
            ov = np.zeros(pred.shape + (4,))
            ov[pred] = (1.0, 0.1, 0.1, 0.45)
            ax.imshow(ov, origin="lower")
            where = f"{p['where']}, " if "where" in p else ""
            ax.set_title(f"{p['title']}\n{where}Dice {common.dice(p['pred'], p['mask']):.2f} on it", fontsize=6.5)
    fig.suptitle(title, fontsize=8)
    common.atomic_savefig(fig, path)
