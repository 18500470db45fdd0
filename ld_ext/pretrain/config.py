"""``TrainConfig``, everything a pre-training run needs, and the ``ld-ext pretrain`` flags made from it.

Each field that the command line sets carries its flag, help text and argparse keywords in its
metadata (``_flag`` / ``_switch``); ``add_config_flags`` turns them into arguments and
``config_from_args`` back into a validated ``TrainConfig``, whose error messages then name the
flags (``validate`` is given the display name of every field).
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Mapping

from .. import distributed as dist_utils
from ..data import DEFAULT_LOCK_TIMEOUT_S, Preprocessing
from ..models import DEFAULT_WIDTHS
from ..objective import LOSS_IMPLS, PD_TEMPERATURE, RD_TEMPERATURE

__all__ = ["TrainConfig", "FLAG_ORDER", "add_config_flags", "config_from_args", "MAX_LR"]

#: the largest --lr accepted (Adam with lr ~ 3e37 overflows float32 in its first step)
MAX_LR = 1000.0


def _flag(flag: str, help: str, **argparse_kwargs) -> dict:
    """Field metadata: the field is set by ``flag`` (argparse keywords beside the default)."""
    return {"flag": flag, "help": help, **argparse_kwargs}


def _switch(flag: str, help: str, negate: bool = False) -> dict:
    """Field metadata: a flag without a value that sets the field to True (False with ``negate``)."""
    return {"flag": flag, "help": help, "action": "store_true", "negate": negate}


@dataclass
class TrainConfig:
    """Everything a pre-training run needs (the CLI flags map one to one)."""

    data: list[str] = field(
        default_factory=list,
        metadata=_flag("--data", "folders (searched recursively) or files", nargs="+", required=True, metavar="PATH"),
    )
    out: str = field(
        default="ld_run",
        metadata=_flag("--out", "output folder (checkpoints, metrics, overlays)", required=True, metavar="DIR"),
    )
    size: int | None = field(
        default=None,
        metadata=_flag(
            "--size",
            "image size (square) fed to the network (default: 128); with --dims 3 the cubic patch edge (default: 64)",
            type=int,
        ),
    )
    channels: int = field(default=1, metadata=_flag("--channels", "1 = gray, 3 = RGB", type=int, choices=(1, 3)))
    emb_dim: int = field(default=32, metadata=_flag("--emb-dim", "D, embedding channels", type=int))
    n_clusters: int = field(default=16, metadata=_flag("--clusters", "K, clusters of stage 2", type=int))
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    batch_size: int = field(
        default=4, metadata=_flag("--batch-size", "B pairs per process and step (5B images)", type=int)
    )
    epochs1: int = field(default=20, metadata=_flag("--epochs1", "stage-1 epochs (PD + mixup)", type=int))
    epochs2: int = field(default=80, metadata=_flag("--epochs2", "stage-2 epochs (LD)", type=int))
    steps_per_epoch: int | None = field(
        default=None, metadata=_flag("--steps-per-epoch", "steps per epoch (default: images / global batch)", type=int)
    )
    lr: float = field(default=1e-3, metadata=_flag("--lr", "Adam learning rate", type=float))
    lr_step: int = field(default=10, metadata=_flag("--lr-step", "halve the learning rate every N epochs", type=int))
    lr_gamma: float = 0.5
    grid: int | None = field(
        default=None,
        metadata=_flag(
            "--grid", "G, patch grid per axis for PD/mixup (default: 8; with --dims 3: 4, i.e. 64 cells)", type=int
        ),
    )
    rd_temperature: float = field(
        default=RD_TEMPERATURE,
        metadata=_flag("--rd-temperature", "tau of region discrimination (docs/method.md section 3)", type=float),
    )
    pd_temperature: float = field(
        default=PD_TEMPERATURE,
        metadata=_flag("--pd-temperature", "T of the patch-discrimination and mixup criterion (section 5)", type=float),
    )
    seed: int = field(
        default=0, metadata=_flag("--seed", "seed of every random choice (items, augmentations, init)", type=int)
    )
    device: str = field(default="auto", metadata=_flag("--device", "auto, cpu or cuda"))
    amp: bool = field(default=True, metadata=_switch("--no-amp", "disable mixed precision on CUDA", negate=True))
    loss_impl: str = field(
        default="fused", metadata=_flag("--loss-impl", "fused ld_ext ops or plain PyTorch", choices=LOSS_IMPLS)
    )
    val_images: int = field(default=4, metadata=_flag("--val-images", "images in the overlay PNGs", type=int))
    nifti_axes: tuple[int, ...] = field(
        default=(2,), metadata=_flag("--nifti-axes", "NIfTI slice axes", type=int, nargs="+")
    )
    min_foreground: float = field(
        default=0.05, metadata=_flag("--min-foreground", "skip NIfTI slices with less foreground", type=float)
    )
    fit: str = field(
        default="pad", metadata=_flag("--fit", "make images square by padding or cropping", choices=("pad", "crop"))
    )
    resume: bool = field(
        default=False,
        metadata=_switch(
            "--resume", "continue the run in OUT from OUT/checkpoint.pt (also from the middle of an epoch)"
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_switch(
            "--overwrite", "replace the run already in OUT (without --resume or --overwrite such an OUT is refused)"
        ),
    )
    init_stage1: str | None = field(
        default=None,
        metadata=_flag(
            "--init-stage1",
            "skip stage 1: start stage 2 from this stage-1 checkpoint (weights matched by name)",
            metavar="CKPT",
        ),
    )
    max_minutes: float | None = field(
        default=None,
        metadata=_flag(
            "--max-minutes",
            "training time budget, shared among the remaining epochs; a stage ends early when another "
            "epoch would overrun its share, and the next stage starts (such a run is not resumable exactly)",
            type=float,
        ),
    )
    progress: bool = field(default=True, metadata=_switch("--no-progress", "no progress bars", negate=True))
    cache: str | None = field(
        default=None,
        metadata=_flag(
            "--cache",
            "where the preprocessed image cache is kept (default OUT/cache); a shared DIR lets runs reuse it",
            metavar="DIR",
        ),
    )
    workers: int | None = field(
        default=None,
        metadata=_flag("--workers", "processes that build the cache (default: the CPUs, at most 8)", type=int),
    )
    loader_workers: int | None = field(
        default=None,
        metadata=_flag(
            "--loader-workers",
            "DataLoader processes reading batches from the cache (default: 0 on CPU, i.e. the "
            "training process reads them; min(4, CPUs/2) on CUDA, with pinned memory)",
            type=int,
        ),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=_flag(
            "--checkpoint-every",
            "also write checkpoint.pt every STEPS steps inside an epoch (0: off)",
            type=int,
            metavar="STEPS",
        ),
    )
    checkpoint_minutes: float | None = field(
        default=10.0,
        metadata=_flag(
            "--checkpoint-minutes",
            "also write checkpoint.pt inside an epoch when MIN minutes passed since the last one",
            type=float,
            metavar="MIN",
        ),
    )
    dist_timeout: float = field(
        default=dist_utils.DEFAULT_TIMEOUT_S,
        metadata=_flag(
            "--dist-timeout",
            "multi-process runs: how long a process waits for the others (start-up and every "
            "collective) before stopping with an error",
            type=float,
            metavar="SECONDS",
        ),
    )
    cache_lock_timeout: float = field(
        default=DEFAULT_LOCK_TIMEOUT_S,
        metadata=_flag(
            "--cache-lock-timeout",
            "how long to wait for another process building the same --cache while it makes no "
            "progress, before stopping with an error naming it (multi-process runs: --dist-timeout)",
            type=float,
            metavar="SECONDS",
        ),
    )
    dtype: str = field(
        default="float32",
        metadata=_flag(
            "--dtype", "training precision (float64: slow, for verification)", choices=("float32", "float64")
        ),
    )
    dims: int = field(
        default=2,
        metadata=_flag(
            "--dims",
            "2: images (slices of volumes); 3: volumes (NIfTI, DICOM series, 3-D .npy), a 3-D network on "
            "cubic patches of edge --size",
            type=int,
            choices=(2, 3),
        ),
    )
    spacing: tuple[float, ...] | None = field(
        default=None,
        metadata=_flag(
            "--spacing",
            "--dims 3: resample every volume to this voxel size in mm (default: keep each volume's)",
            type=float,
            nargs=3,
            metavar=("X", "Y", "Z"),
        ),
    )
    window: tuple[float, ...] | None = field(
        default=None,
        metadata=_flag(
            "--window",
            "--dims 3: intensity window mapped to [0, 1], e.g. -1000 400 for CT in HU (default: --percentiles)",
            type=float,
            nargs=2,
            metavar=("LOW", "HIGH"),
        ),
    )
    percentiles: tuple[float, ...] = field(
        default=(0.5, 99.5),
        metadata=_flag(
            "--percentiles",
            "--dims 3 without --window: each volume's intensity percentiles mapped to [0, 1] (MR)",
            type=float,
            nargs=2,
            metavar=("LOW", "HIGH"),
        ),
    )
    # stage 3; the CLI's default is pretrain_stage.DEFAULT_CENTRE_STEPS (add_config_flags' cli_defaults)
    centre_steps: int = field(
        default=0,
        metadata=_flag(
            "--centre-steps",
            "stage 3: N steps of the centre-sensitive landmark term on warps of the same images "
            "(0: off; process 0 only; not counted in --max-minutes)",
            type=int,
            metavar="N",
        ),
    )

    def __post_init__(self) -> None:
        # the defaults that depend on --dims (a 3-D grid of 4^3 cells has as many cells as 8^2)
        if self.size is None:
            self.size = 64 if self.dims == 3 else 128
        if self.grid is None:
            self.grid = 4 if self.dims == 3 else 8

    def validate(self, names: Mapping[str, str] | None = None) -> "TrainConfig":
        """Check every field; returns self. ``names`` maps a field to the name an error message
        gives it (the command line passes its flags); by default the field's own name."""

        def n(name: str) -> str:
            return names.get(name, name) if names else name

        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{n(name)} must be an int >= {minimum}, got {v!r}")

        for name in ("size", "emb_dim", "n_clusters", "batch_size", "lr_step", "grid"):
            pos_int(name)
        for name in ("epochs1", "epochs2", "val_images"):
            pos_int(name, 0)
        if self.size < 16:
            raise ValueError(f"{n('size')} must be >= 16, got {self.size}")
        if self.size % self.grid:
            warnings.warn(
                f"size {self.size} is not a multiple of grid {self.grid}; patch cells are uneven", stacklevel=2
            )
        if self.epochs1 + self.epochs2 == 0:
            raise ValueError(f"{n('epochs1')} + {n('epochs2')} must be > 0")
        if self.init_stage1 is not None and self.epochs2 == 0:
            raise ValueError(f"{n('init_stage1')} starts stage 2 from a stage-1 checkpoint: {n('epochs2')} must be > 0")
        if self.steps_per_epoch is not None:
            pos_int("steps_per_epoch")
        if self.channels not in (1, 3):
            raise ValueError(f"{n('channels')} must be 1 or 3, got {self.channels!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr <= MAX_LR:
            # above it Adam's step overflows float32 (a RuntimeError from torch) long before any use
            raise ValueError(f"{n('lr')} must be a number in (0, {MAX_LR:g}], got {self.lr!r}")
        for name in ("rd_temperature", "pd_temperature"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
                raise ValueError(f"{n(name)} must be a positive number, got {t!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"{n('loss_impl')} must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"{n('max_minutes')} must be > 0, got {self.max_minutes!r}")
        if self.resume and self.overwrite:
            raise ValueError(
                f"{n('resume')} and {n('overwrite')} exclude each other: continue the run in {n('out')}, or replace it"
            )
        pos_int("checkpoint_every", 0)
        pos_int("centre_steps", 0)
        self._validate_volume_options(n)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{n('dtype')} must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("workers", "loader_workers"):
            if getattr(self, name) is not None:
                pos_int(name, 0)
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"{n('checkpoint_minutes')} must be > 0 (or None), got {self.checkpoint_minutes!r}")
        if (
            isinstance(self.dist_timeout, bool)
            or not isinstance(self.dist_timeout, (int, float))
            or not self.dist_timeout > 0
        ):
            raise ValueError(f"{n('dist_timeout')} must be a positive number of seconds, got {self.dist_timeout!r}")
        t = self.cache_lock_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
            raise ValueError(f"{n('cache_lock_timeout')} must be a positive number of seconds, got {t!r}")
        return self

    def _validate_volume_options(self, n) -> None:
        """--dims and the options of volumes (--spacing, --window, --percentiles), normalised to tuples of floats."""
        if isinstance(self.dims, bool) or self.dims not in (2, 3):
            raise ValueError(f"{n('dims')} must be 2 or 3, got {self.dims!r}")

        def numbers(name, count):
            v = getattr(self, name)
            ok = isinstance(v, (list, tuple)) and len(v) == count
            ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok:
                raise ValueError(f"{n(name)} must be {count} finite numbers, got {v!r}"[:300])
            setattr(self, name, tuple(float(x) for x in v))
            return getattr(self, name)

        if self.spacing is not None and min(numbers("spacing", 3)) <= 0:
            raise ValueError(f"{n('spacing')} must be 3 voxel sizes in mm > 0, got {list(self.spacing)}")
        if self.window is not None:
            lo, hi = numbers("window", 2)
            if not lo < hi:
                raise ValueError(f"{n('window')} must be LOW HIGH with LOW < HIGH, got {lo:g} {hi:g}")
        lo, hi = numbers("percentiles", 2)
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"{n('percentiles')} must be LOW HIGH with 0 <= LOW < HIGH <= 100, got {lo:g} {hi:g}")
        if self.dims == 3 and self.channels != 1:
            raise ValueError(f"{n('channels')} must be 1 with {n('dims')} 3 (volumes have one channel)")
        if self.dims == 2:
            given = [n(k) for k in ("spacing", "window") if getattr(self, k) is not None]
            if self.percentiles != (0.5, 99.5):
                given.append(n("percentiles"))
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"{', '.join(given)} {verb} to volumes only: add {n('dims')} 3")

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.size, self.channels, tuple(self.nifti_axes), self.min_foreground, fit=self.fit)

    def to_dict(self) -> dict:
        """The fields as plain values (tuples as lists), as a training checkpoint stores them."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["nifti_axes"] = list(self.nifti_axes)
        for k in ("spacing", "window", "percentiles"):
            d[k] = None if d[k] is None else list(d[k])
        return d


# The order of the flags in --help (the fields keep theirs: a checkpoint stores them in field order).
FLAG_ORDER = (
    "data",
    "out",
    "size",
    "channels",
    "emb_dim",
    "n_clusters",
    "batch_size",
    "epochs1",
    "epochs2",
    "steps_per_epoch",
    "lr",
    "lr_step",
    "grid",
    "rd_temperature",
    "pd_temperature",
    "seed",
    "device",
    "amp",
    "loss_impl",
    "val_images",
    "nifti_axes",
    "min_foreground",
    "fit",
    "max_minutes",
    "resume",
    "overwrite",
    "cache",
    "workers",
    "loader_workers",
    "checkpoint_every",
    "checkpoint_minutes",
    "dist_timeout",
    "cache_lock_timeout",
    "init_stage1",
    "progress",
    "dtype",
    "centre_steps",
    "dims",
    "spacing",
    "window",
    "percentiles",
)


def _flag_fields() -> list[Field]:
    """The fields set on the command line, in FLAG_ORDER."""
    by_name = {f.name: f for f in fields(TrainConfig) if "flag" in f.metadata}
    if set(by_name) != set(FLAG_ORDER):
        raise AssertionError(
            f"FLAG_ORDER does not list the fields with a flag: {sorted(set(by_name) ^ set(FLAG_ORDER))}"
        )
    return [by_name[name] for name in FLAG_ORDER]


def _default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def _dest(f: Field) -> str:
    """The argparse attribute of a field's flag (argparse's own rule: "--emb-dim" -> "emb_dim")."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def add_config_flags(parser: argparse.ArgumentParser, cli_defaults: Mapping[str, object] | None = None) -> None:
    """One flag per TrainConfig field that has one; ``cli_defaults`` replaces a field's default on
    the command line (by field name)."""
    cli_defaults = cli_defaults or {}
    for f in _flag_fields():
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("flag", "negate")}
        if kwargs.get("action") is None and not kwargs.get("required"):
            default = cli_defaults.get(f.name, _default(f))
            kwargs["default"] = list(default) if "nargs" in kwargs and default is not None else default
        parser.add_argument(f.metadata["flag"], **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The (validated) TrainConfig of ``ld-ext pretrain``'s arguments; a bad value's error names its flag."""
    values, names = {}, {}
    for f in _flag_fields():
        value = getattr(args, _dest(f))
        if f.metadata.get("negate"):
            value = not value
        else:
            names[f.name] = f.metadata["flag"]
        default = _default(f)
        if isinstance(default, (list, tuple)) or (f.metadata.get("nargs") and value is not None):
            value = (type(default) if isinstance(default, (list, tuple)) else tuple)(value)
        values[f.name] = value
    return TrainConfig(**values).validate(names)
