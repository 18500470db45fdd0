"""What ``ld-ext pretrain --dims 3`` does differently from 2-D: the data are volumes in a volume
cache (``ld_ext.data.volume_cache``), read one cubic patch at a time; the views are those of
``augment.VolumeViewGenerator``; the validation overlays show the middle axial slice of centre
patches. Everything else (stages, objective, checkpoints, resume, processes) is the 2-D loop's.

Each helper here takes the run's ``TrainConfig`` and answers for both cases, so that the loop
calls one function where 2-D and 3-D differ.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ..augment import AugmentConfig, LDViewGenerator, VolumeViewGenerator, item_generator
from ..data import mark_output_folder, open_or_build_volume_cache
from .config import TrainConfig
from .outputs import data_summary

__all__ = [
    "is_volume_dataset",
    "open_volumes",
    "dataset_fingerprint",
    "summary_lines",
    "validation_inputs",
    "view_generator",
    "check_resume_dims",
    "check_volume_dataset",
    "lock_timeout_of",
]

logger = logging.getLogger("ld_ext.train")


def is_volume_dataset(dataset) -> bool:
    """A volume data set: ``shapes`` and ``read_patch`` (``data.volume_cache.VolumePatchDataset``)."""
    return hasattr(dataset, "read_patch") and hasattr(dataset, "shapes")


def open_volumes(cfg: TrainConfig, out: Path, env_rank: int, lock_timeout: float):
    """``cfg.data`` read into the volume cache (``cfg.cache``, default ``OUT/cache``; built once,
    reused by later runs with the same files and settings) and opened."""
    cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"
    if env_rank == 0:  # outputs are never inputs (as in 2-D)
        mark_output_folder(out, ("overlays", "losses.png", "cache"))
    return open_or_build_volume_cache(
        cfg.data,
        cache=cache_dir,
        spacing=cfg.spacing,
        window=cfg.window,
        percentiles=cfg.percentiles,
        lock_timeout=lock_timeout,
        exclude=[out, out / "overlays", out / "losses.png"],
        progress=cfg.progress and env_rank == 0,
        log=logger.info if env_rank == 0 else None,
    )


def check_volume_dataset(cfg: TrainConfig, dataset) -> None:
    """The data set fits the run: volumes for ``--dims 3``, images for 2-D."""
    if cfg.dims == 3 and not is_volume_dataset(dataset):
        raise TypeError(
            f"--dims 3 trains on volumes: dataset must be a volume cache (read_patch, shapes), got "
            f"{type(dataset).__name__}"
        )
    if cfg.dims == 3 and len(dataset) == 0:
        raise ValueError("--dims 3: --data holds no volume (.nii, .nii.gz, 3-D .npy, or a folder of DICOM slices)")


def dataset_fingerprint(dataset) -> str:
    """The data set's fingerprint (a volume stand-in without one: its names and shapes)."""
    fp = getattr(dataset, "fingerprint", None)
    if fp is not None:
        return str(fp)
    text = repr([(str(n), tuple(s)) for n, s in zip(dataset.names, dataset.shapes)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summary_lines(cfg: TrainConfig, dataset) -> list[str]:
    """The data lines logged before training (2-D: ``outputs.data_summary``)."""
    if cfg.dims == 2:
        return data_summary(dataset, cfg.size, cfg.channels)
    read_size = VolumeViewGenerator(cfg.size).read_size
    shapes = [tuple(int(v) for v in s) for s in dataset.shapes]
    smallest = min(shapes, key=lambda s: s[0] * s[1] * s[2])
    largest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    lines = [
        f"data: {len(shapes)} volume(s), from {'x'.join(map(str, smallest))} to {'x'.join(map(str, largest))} voxels"
    ]
    skipped = list(getattr(dataset, "skipped", []) or [])
    if skipped:
        lines.append(f"data: skipped {len(skipped)} file(s); first: {skipped[0][0]} ({str(skipped[0][1])[:80]})")
    small = sum(1 for s in shapes if min(s) < cfg.size)
    note = f"; {small} volume(s) smaller than {cfg.size} along an axis (zeros around them)" if small else ""
    edge = f" (read as {read_size}^3 for the small view warps)" if read_size and read_size != cfg.size else ""
    lines.append(f"data: training on random {cfg.size}x{cfg.size}x{cfg.size} patches{edge}{note}")
    return lines


def validation_inputs(cfg: TrainConfig, dataset, n: int) -> torch.Tensor:
    """The fixed validation inputs of the overlays: ``cfg.val_images`` images picked with the seed
    (2-D), or the centre patch of as many volumes (3-D, (V, 1, S, S, S); only the patches are read)."""
    vi = torch.randperm(n, generator=item_generator(cfg.seed, -3))[: min(cfg.val_images, n)]
    if cfg.dims == 2:
        return dataset.read(vi)
    s = cfg.size
    patches = []
    for i in vi.tolist():
        start = [(int(d) - s) // 2 for d in dataset.shapes[i]]
        patches.append(dataset.read_patch(i, start, (s, s, s)))
    return torch.stack(patches) if patches else torch.zeros(0, 1, s, s, s)


def view_generator(cfg: TrainConfig) -> LDViewGenerator | VolumeViewGenerator:
    return VolumeViewGenerator(cfg.size) if cfg.dims == 3 else LDViewGenerator(cfg.size, AugmentConfig())


def check_resume_dims(prev: dict, cfg: TrainConfig, ckpt_path: Path) -> None:
    """A 2-D run resumed with ``--dims 3`` (or the reverse) is refused in one line (a checkpoint
    written before 3-D runs existed is 2-D)."""
    before = prev.get("dims", 2)
    if before != cfg.dims:
        raise ValueError(
            f"checkpoint {ckpt_path} is of a {before}-D run (--dims {before}), this run asks for --dims {cfg.dims}; "
            "use the same --dims to resume (or --overwrite to start a new run)"
        )


def lock_timeout_of(cfg: TrainConfig) -> float:
    """How long to wait for another builder of the cache: --dist-timeout in a multi-process run."""
    return cfg.dist_timeout if int(os.environ.get("WORLD_SIZE", "1")) > 1 else cfg.cache_lock_timeout
