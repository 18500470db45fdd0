"""LD pre-training: both stages, exact resume, multi-process on torch.distributed.

``ld-ext pretrain --data PATH... --out DIR`` (or ``pretrain(TrainConfig(...))``):

* stage 1: network without the clustering branch, L = L_pd + L_mix;
* stage 2: the clustering branch is added, every other weight comes from stage 1 (by name),
  L = L_pd + L_mix + 10 L_rd + 0.1 L_ent (docs/method.md sections 5 and 6);
* stage 3 (``centre_steps`` > 0; ``--centre-steps``, on by default on the command line): the
  centre-sensitive landmark term on warps of the same images, process 0 only, ``stage3.pt``
  (``ld_ext.tasks.landmarks.pretrain_stage``; docs/tasks.md).

Each stage has its own Adam optimiser (lr 1e-3) halved every ``lr_step`` epochs. All randomness
of an epoch (item order, partner images, augmentations) is derived from (seed, stage, epoch,
step, item) so that ``--resume`` continues exactly and 2 processes x B equal 1 process x 2B.

Outputs in ``--out``: ``checkpoint.pt`` (latest complete epoch, with optimiser, scheduler, RNG
states), ``stage1.pt``/``stage2.pt`` (weights at the end of each stage), ``model.pt`` (final),
``metrics.jsonl`` (one JSON record per epoch), ``overlays/`` (PNG per epoch of a fixed
validation set), ``losses.png``. All files are written to a temp name and renamed; SIGINT/SIGTERM
arriving during a checkpoint write are delivered after it. An ``--out`` that already holds a run
is refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set. Progress is
reported through logging (logger ``ld_ext.train``): one line per epoch.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from . import reference
from .augment import AugmentConfig, LDViewGenerator, ViewBatch, align_to_v1, item_generator
from .checkpoint import atomic_write_bytes, defer_signals, load_checkpoint, remove_stale_temp_files, save_checkpoint
from .data import CachedImageDataset, ImageFolderDataset, Preprocessing, open_or_build_cache
from .models import DEFAULT_WIDTHS, LDNet

__all__ = [
    "LOSS_IMPLS",
    "LDCriterion",
    "TrainConfig",
    "pretrain",
    "make_training_step",
    "add_arguments",
    "run",
]

logger = logging.getLogger(__name__)

LOSS_IMPLS = ("fused", "reference")
W_RD = 10.0
W_ENT = 0.1


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Low-precision tensors to float32; float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (torch.norm(x, p=2, dim=dim, keepdim=True) + reference.NORM_EPS)


class LDCriterion:
    """The LD losses of one step, from the raw network outputs of a ``ViewBatch``.

    ``loss_impl="fused"`` uses the ld_ext ops (region features + entropy in one fused pass over
    the raw decoder outputs, fused region discrimination and patch discrimination);
    ``"reference"`` uses the plain-PyTorch ``ld_ext.reference`` functions. In a torch.distributed
    job the region features, PD rows, mixup rows and entropy are all-gathered (with gradients) so
    every term is computed over the global batch.
    """

    def __init__(
        self,
        loss_impl: str = "fused",
        grid: int = 8,
        pd_temperature: float = 0.1,
        rd_temperature: float = 0.2,
        w_rd: float = W_RD,
        w_ent: float = W_ENT,
    ) -> None:
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        self.loss_impl = loss_impl
        self.grid = grid
        self.pd_temperature = pd_temperature
        self.rd_temperature = rd_temperature
        self.w_rd, self.w_ent = w_rd, w_ent
        if loss_impl == "fused":
            from . import ops

            self._ops = ops

    def _pd(self, x: torch.Tensor) -> torch.Tensor:
        if self.loss_impl == "fused":
            return self._ops.patch_discrimination(x, self.pd_temperature)
        return reference.patch_discrimination(x, self.pd_temperature)

    def __call__(self, z: torch.Tensor, s: torch.Tensor | None, views: ViewBatch) -> dict[str, torch.Tensor]:
        b = views.batch_size
        if z.shape[0] != 5 * b:
            raise ValueError(f"z must hold 5B = {5 * b} images, got {z.shape[0]}")
        g = self.grid
        gather = dist_utils.all_gather_with_grad
        e = reference.normalize_embeddings(_f32(z))
        f = _unit(F.adaptive_avg_pool2d(e, g), dim=1)  # (5B, D, G, G)
        d = f.shape[1]
        f_v2 = align_to_v1(f[2 * b : 4 * b], views.flip_h, views.flip_v, views.rot_k)
        w = views.mix_w.to(f.dtype).view(-1, 1, 1, 1)
        target = _unit(w * f[:b] + (1 - w) * f[b : 2 * b], dim=1).detach()

        def rows(x):  # (n, D, G, G) -> (n, G*G, D)
            return x.flatten(2).transpose(1, 2)

        pd_local = torch.stack([rows(f[:b]), rows(f[b : 2 * b]), rows(f_v2[:b]), rows(f_v2[b:])])  # (4, B, GG, D)
        mix_local = torch.stack([rows(f[4 * b :]), rows(target)])  # (2, B, GG, D)
        l_pd = self._pd(gather(pd_local, dim=1).reshape(-1, d))
        l_mix = self._pd(gather(mix_local, dim=1).reshape(-1, d))
        out = {"pd": l_pd, "mix": l_mix}
        loss = l_pd + l_mix
        if s is not None:
            zv, sv = z[: 4 * b], s[: 4 * b]
            if self.loss_impl == "fused":
                feats, ent = self._ops.region_features_and_entropy(zv, sv, normalize=True, assignment="sigmoid")
            else:
                zv, sv = _f32(zv), _f32(sv)
                feats = reference.region_features_bmm(zv, sv, normalize=True, assignment="sigmoid")
                ent = reference.assignment_entropy(sv, "sigmoid")
            feats = gather(_f32(feats), dim=0)
            ent = gather(_f32(ent).reshape(1), dim=0).mean()
            if self.loss_impl == "fused":
                l_rd = self._ops.region_discrimination(feats, self.rd_temperature)
            else:
                l_rd = reference.region_discrimination(feats, self.rd_temperature)
            out["rd"], out["ent"] = l_rd, ent
            loss = loss + self.w_rd * l_rd + self.w_ent * ent
        out["loss"] = loss
        return out


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a pre-training run needs (the CLI flags map one to one)."""

    data: list[str] = field(default_factory=list)
    out: str = "ld_run"
    size: int = 128
    channels: int = 1
    emb_dim: int = 32
    n_clusters: int = 16
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    batch_size: int = 4
    epochs1: int = 20
    epochs2: int = 80
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.5
    grid: int = 8
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    loss_impl: str = "fused"
    val_images: int = 4
    nifti_axes: tuple[int, ...] = (2,)
    min_foreground: float = 0.05
    fit: str = "pad"
    resume: bool = False
    overwrite: bool = False
    init_stage1: str | None = None
    max_minutes: float | None = None
    progress: bool = True
    cache: str | None = None
    workers: int | None = None
    loader_workers: int | None = None
    checkpoint_every: int = 0
    checkpoint_minutes: float | None = 10.0
    dist_timeout: float = dist_utils.DEFAULT_TIMEOUT_S
    dtype: str = "float32"
    centre_steps: int = 0  # stage 3; the CLI's default is pretrain_stage.DEFAULT_CENTRE_STEPS

    def validate(self) -> "TrainConfig":
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        for n in ("size", "emb_dim", "n_clusters", "batch_size", "lr_step", "grid"):
            pos_int(n)
        for n in ("epochs1", "epochs2", "val_images"):
            pos_int(n, 0)
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if self.size % self.grid:
            warnings.warn(f"size {self.size} is not a multiple of grid {self.grid}; patch cells are uneven", stacklevel=2)
        if self.epochs1 + self.epochs2 == 0:
            raise ValueError("epochs1 + epochs2 must be > 0")
        if self.init_stage1 is not None and self.epochs2 == 0:
            raise ValueError("init_stage1 starts stage 2 from a stage-1 checkpoint: epochs2 must be > 0")
        if self.steps_per_epoch is not None:
            pos_int("steps_per_epoch")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out, or replace it")
        pos_int("checkpoint_every", 0)
        pos_int("centre_steps", 0)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("workers", "loader_workers"):
            if getattr(self, name) is not None:
                pos_int(name, 0)
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be > 0 (or None), got {self.checkpoint_minutes!r}")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) or not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}")
        return self

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.size, self.channels, tuple(self.nifti_axes), self.min_foreground, fit=self.fit)


# The files a run writes into --out (overlays/ holds stageS_epochEEE.png).
RUN_FILES = ("checkpoint.pt", "stage1.pt", "stage2.pt", "stage3.pt", "model.pt", "metrics.jsonl", "losses.png")


def existing_run_files(out: Path) -> list[str]:
    """The files of a previous run in ``out`` (names relative to it)."""
    found = [n for n in RUN_FILES if (out / n).exists()]
    ov = out / "overlays"
    if ov.is_dir():
        found += [f"overlays/{p.name}" for p in sorted(ov.glob("stage*_epoch*.png"))]
    return found


def _clean_temp_files(out: Path) -> None:
    """Temp files of checkpoint/metric/overlay writes that a killed run left in out."""
    removed = remove_stale_temp_files(out, RUN_FILES) + remove_stale_temp_files(out / "overlays")
    if removed:
        logger.info("removed %d temp file(s) of an interrupted write in %s", len(removed), out)


def _validate_resume_state(state: dict, path: Path) -> dict:
    """Check a training checkpoint's entries (types, ranges) before anything is built from it."""
    where = f"checkpoint {path}"
    for key in ("stage", "epoch", "optimizer", "scheduler", "model"):
        if key not in state:
            raise ValueError(f"{where} is not a training checkpoint (no {key!r}); resume needs OUT/checkpoint.pt")
    stage, epoch = state["stage"], state["epoch"]
    if isinstance(stage, bool) or stage not in (1, 2) or not isinstance(stage, int):
        raise ValueError(f"{where}: 'stage' must be 1 or 2, got {stage!r}"[:300])
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= 10**7:
        raise ValueError(f"{where}: 'epoch' must be an int >= 0, got {epoch!r}"[:300])
    step = state.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 10**9:
        raise ValueError(f"{where}: 'step' must be an int >= 0, got {step!r}"[:300])
    sums = state.get("sums")
    if sums is not None and not (
        isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for k, v in sums.items())
    ):
        raise ValueError(f"{where}: 'sums' must map loss names to numbers")
    for key in ("optimizer", "scheduler"):
        if not isinstance(state[key], dict):
            raise ValueError(f"{where}: {key!r} must be a dict (a state_dict), got {type(state[key]).__name__}")
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise ValueError(f"{where}: 'optimizer' is not an optimiser state_dict (needs 'state' and 'param_groups')")
    tc = state.get("train_config", {})
    if not isinstance(tc, dict):
        raise ValueError(f"{where}: 'train_config' must be a dict, got {type(tc).__name__}")
    rng = state.get("rng")
    if rng is not None:
        ok = (
            isinstance(rng, dict)
            and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("python"), list) and len(rng["python"]) == 626
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rng["python"])
            and isinstance(rng.get("numpy"), torch.Tensor) and rng["numpy"].numel() == 624
            and isinstance(rng.get("numpy_pos"), int)
        )
        if not ok:
            raise ValueError(f"{where}: 'rng' is not the RNG state ld_ext writes")
    return state


def _same_kind(fresh, loaded) -> bool:
    """Loaded value has the type of the freshly made one (numbers: int/float interchangeable)."""
    num = (int, float)
    if isinstance(fresh, bool) or isinstance(loaded, bool):
        return isinstance(fresh, bool) and isinstance(loaded, bool)
    if isinstance(fresh, num):
        return isinstance(loaded, num) and math.isfinite(loaded)
    if isinstance(fresh, (list, tuple)):
        return isinstance(loaded, (list, tuple)) and len(loaded) == len(fresh) and all(
            _same_kind(a, b) for a, b in zip(fresh, loaded)
        )
    if fresh is None:
        return loaded is None
    return type(fresh) is type(loaded)


def _check_like(fresh: dict, loaded: dict, what: str) -> None:
    """``loaded`` has exactly the entries of ``fresh``, each of the same kind (a torch state_dict
    of the same optimiser/scheduler); torch's load_state_dict checks little of this itself."""
    extra = [k for k in loaded if k not in fresh]
    missing = [k for k in fresh if k not in loaded]
    if extra or missing:
        raise ValueError(f"{what} has entries {sorted(map(str, extra))[:5]} it should not have and lacks {missing[:5]}")
    for k, v in fresh.items():
        if not _same_kind(v, loaded[k]):
            raise ValueError(f"{what} entry {k!r} is {loaded[k]!r:.80}, expected something like {v!r:.80}")


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    fresh = opt.state_dict()
    groups = sd["param_groups"]
    if len(groups) != len(fresh["param_groups"]) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"{len(groups)} parameter groups, expected {len(fresh['param_groups'])}")
    for fg, g in zip(fresh["param_groups"], groups):
        _check_like({k: v for k, v in fg.items() if k != "params"}, {k: v for k, v in g.items() if k != "params"},
                    "parameter group")
        if not isinstance(g.get("params"), list) or len(g["params"]) != len(fg["params"]):
            raise ValueError("parameter group lists the wrong number of parameters")
    params = [p for grp in opt.param_groups for p in grp["params"]]
    ids = [i for g in groups for i in g["params"]]
    for key, st in sd["state"].items():
        if key not in ids or not isinstance(st, dict):
            raise ValueError(f"state of unknown parameter {key!r}")
        shape = params[ids.index(key)].shape
        for name, t in st.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state {name!r} of parameter {key} is not a tensor")
            if t.dim() > 0 and t.shape != shape:
                raise ValueError(f"state {name!r} of parameter {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    opt.load_state_dict(sd)


def _load_scheduler(sched, sd: dict) -> None:
    _check_like(sched.state_dict(), sd, "scheduler state")
    sched.load_state_dict(sd)


def _restore(path: Path, what: str, fn) -> None:
    """Load a part of a training checkpoint; any failure becomes a ValueError naming the file."""
    try:
        fn()
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        msg = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise ValueError(f"checkpoint {path}: its {what} cannot be restored ({type(exc).__name__}: {msg})") from exc


# ----------------------------------------------------------------------------- helpers


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((3, tuple(int(v) for v in py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_order(n: int, stage: int, epoch: int, seed: int) -> torch.Tensor:
    """The item order of one epoch (a permutation of the n images)."""
    return torch.randperm(n, generator=item_generator(seed, stage, epoch, -1))


def _batch_indices(n: int, stage: int, epoch: int, step: int, global_batch: int, seed: int, order: torch.Tensor | None = None):
    """Global item indices, their partner images and the items' global numbers for one step.

    ``order`` is ``_epoch_order(n, stage, epoch, seed)`` when the caller already has it.
    """
    if order is None:
        order = _epoch_order(n, stage, epoch, seed)
    pos = (step * global_batch + torch.arange(global_batch)) % n
    idx = order[pos]
    if n > 1:
        g = item_generator(seed, stage, epoch, -2, step)
        partner = (idx + 1 + torch.randint(0, n - 1, (global_batch,), generator=g)) % n
    else:
        partner = idx.clone()
    return idx, partner, step * global_batch + torch.arange(global_batch)


class _StepImages(torch.utils.data.Dataset):
    """Item ``(stage, epoch, step)``: this process's share of one step, the B item images followed by
    their B partner images, (2B, C, S, S), read from the data set (for a cache: just those images).

    Everything is derived from the key, so DataLoader workers need no shared state and the batches
    are those of ``_batch_indices`` whatever the worker count.
    """

    def __init__(self, dataset, n: int, global_batch: int, batch: int, rank: int, seed: int) -> None:
        self.dataset, self.n, self.gb, self.b, self.rank, self.seed = dataset, n, global_batch, batch, rank, seed
        self._order_key: tuple | None = None
        self._order: torch.Tensor | None = None

    def indices(self, stage: int, epoch: int, step: int) -> torch.Tensor:
        if self._order_key != (stage, epoch):
            self._order, self._order_key = _epoch_order(self.n, stage, epoch, self.seed), (stage, epoch)
        idx, partner, _ = _batch_indices(self.n, stage, epoch, step, self.gb, self.seed, self._order)
        sl = slice(self.rank * self.b, (self.rank + 1) * self.b)
        return torch.cat([idx[sl], partner[sl]])

    def __getitem__(self, key) -> torch.Tensor:
        return self.dataset.read(self.indices(*key))

    def __len__(self) -> int:  # not used for sampling (the sampler gives the keys)
        return 0


class _StepKeys(torch.utils.data.Sampler):
    """The keys of the steps still to run in the current epoch (set before each pass)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []

    def set(self, stage: int, epoch: int, start: int, steps: int) -> None:
        self.keys = [(stage, epoch, s) for s in range(start, steps)]

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def _default_loader_workers(device: torch.device) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    # CPU: reading a step's images from the cache takes well under 1 % of the step (benchmarks/
    # data_pipeline.py), so the main process reads them itself; a worker would only compete for
    # the cores the training uses
    return min(4, max(1, cpus // 2)) if device.type == "cuda" else 0


class _Batches:
    """The per-step source images of one process, from memory or streamed from the cache.

    An in-memory data set (``ImageFolderDataset``) is moved to the device once and indexed there.
    A ``CachedImageDataset`` is read by a DataLoader (``workers`` processes, pinned memory on CUDA,
    prefetching) one step at a time; nothing of the size of the data set is held.
    ``wait_s`` accumulates the time the training loop spent waiting for the next batch.
    """

    def __init__(self, dataset, n: int, gb: int, b: int, rank: int, seed: int, device: torch.device, workers: int) -> None:
        self.device, self.b = device, b
        self.source = _StepImages(dataset, n, gb, b, rank, seed)
        self.streaming = not isinstance(dataset, ImageFolderDataset)
        self.wait_s = 0.0
        if not self.streaming:
            self.images_dev = dataset.images.to(device)
            return
        self.keys = _StepKeys()
        pin = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            self.source, batch_size=None, sampler=self.keys, num_workers=workers, pin_memory=pin,
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),  # never draws from the global RNG
        )

    def epoch(self, stage: int, epoch: int, start: int, steps: int):
        """Yield (step, img1, img2) on the device for steps ``start .. steps - 1``."""
        if not self.streaming:
            for step in range(start, steps):
                t = time.perf_counter()
                ix = self.source.indices(stage, epoch, step).to(self.device)
                both = self.images_dev[ix]
                self.wait_s += time.perf_counter() - t
                yield step, both[: self.b], both[self.b :]
            return
        self.keys.set(stage, epoch, start, steps)
        it = iter(self.loader)
        for step in range(start, steps):
            t = time.perf_counter()
            both = next(it).to(self.device, non_blocking=True)
            self.wait_s += time.perf_counter() - t
            yield step, both[: self.b], both[self.b :]


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast(device.type, enabled=False), None


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


@torch.no_grad()
def predict(model: LDNet, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, s) of images in [0, 1] (normalised inside), in eval mode, on the model's device."""
    from .augment import normalize_intensity

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    zs, ss = [], []
    for i in range(0, images.shape[0], batch_size):
        z, s = model(normalize_intensity(images[i : i + batch_size].to(dev, next(model.parameters()).dtype)))
        zs.append(z.float().cpu())
        if s is not None:
            ss.append(s.float().cpu())
    model.train(was)
    return torch.cat(zs), (torch.cat(ss) if ss else None)


def save_overlays(model: LDNet, images: torch.Tensor, path: Path) -> Path:
    """Validation overlays: image | cluster arg-max overlay (stage 2) or embedding PCA (stage 1)."""
    from . import viz

    z, s = predict(model, images)
    titles = ["image", "embedding (PCA)"] + (["clusters"] if s is not None else [])
    rows = []
    for i in range(images.shape[0]):
        row = [viz.overlay_clusters(images[i], torch.zeros(images.shape[-2:], dtype=torch.long), 1, alpha=0.0)]
        row.append(viz.embedding_rgb(z[i]))
        if s is not None:
            row.append(viz.overlay_clusters(images[i], s[i].argmax(0), s.shape[1]))
        rows.append(row)
    return viz.save_grid(rows, path, titles=titles)


# ----------------------------------------------------------------------------- the trainer


def _make_model(cfg: TrainConfig, stage: int) -> LDNet:
    return LDNet(cfg.channels, cfg.emb_dim, cfg.n_clusters if stage == 2 else None, cfg.widths)


def pretrain(
    cfg: TrainConfig,
    dataset: ImageFolderDataset | CachedImageDataset | None = None,
    val_images: torch.Tensor | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    on_step_end: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) both LD stages; returns a summary dict (paths, last metrics, timing).

    ``dataset`` overrides ``cfg.data``: an ``ImageFolderDataset`` is held in (device) memory, a
    ``CachedImageDataset`` is streamed; by default ``cfg.data`` is preprocessed once into the
    cache (``cfg.cache``, default ``OUT/cache``) and streamed from it. ``val_images`` (V, C, S, S)
    in [0, 1] overrides the fixed validation set (default: ``cfg.val_images`` images of the
    dataset picked with the seed). ``on_epoch_end(record)`` is called after each epoch's
    checkpoint is written, ``on_step_end({"stage", "epoch", "step", "checkpointed", "losses"})``
    after each step (``step`` counts the steps done in the epoch; ``checkpointed``: a mid-epoch
    checkpoint was just written; ``losses``: the step's loss terms as floats).

    In a multi-process run a failed or timed-out collective (a frozen or dead process) is
    reported as a ``RuntimeError`` that says so, after at most ``cfg.dist_timeout`` seconds.
    """
    try:
        return _pretrain(cfg, dataset, val_images, on_epoch_end, on_step_end)
    except RuntimeError as exc:
        if dist_utils.is_distributed() and _collective_failure(exc):
            raise dist_utils.collective_error(exc, cfg.dist_timeout) from exc
        raise


def _collective_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    msg = str(exc).lower()
    return any(k in msg for k in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


def _load_for_all(path: Path, check: Callable[[dict], None] | None = None, missing: str | None = None) -> dict:
    """A checkpoint read by process 0 only and broadcast; a problem is raised on every process
    (``missing``: the ValueError message for a file that does not exist)."""
    payload: tuple = (None, None, None)
    if dist_utils.rank() == 0:
        try:
            if missing is not None and not path.exists():
                raise ValueError(missing)
            st = load_checkpoint(path, map_location="cpu")
            if check is not None:
                check(st)
            payload = (st, None, None)
        except FileNotFoundError as exc:
            payload = (None, "missing", str(exc))
        except ValueError as exc:
            payload = (None, "invalid", str(exc))
    st, kind, msg = dist_utils.broadcast_object(payload)
    if kind is not None:
        raise (FileNotFoundError if kind == "missing" else ValueError)(msg)
    return st


def _pretrain(cfg, dataset, val_images, on_epoch_end, on_step_end) -> dict:
    cfg.validate()
    env_rank = int(os.environ.get("RANK", "0"))
    # Refusals first: nothing (not even the cache in OUT/cache) is written before them.
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    previous = existing_run_files(out) if out.is_dir() else []
    if previous and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"{out} already holds a run ({shown}); use --resume to continue it, --overwrite to replace it, "
            "or another --out"
        )
    if dataset is None:
        if not cfg.data:
            raise ValueError("data: give at least one folder or file (--data PATH ...)")
        for d in cfg.data:  # a mistyped path is reported before anything is written
            if not Path(d).exists():
                raise ValueError(f"data path does not exist: {d}")
        cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"
        dataset = open_or_build_cache(
            cfg.data, cfg.preprocessing(), cache_dir, workers=cfg.workers, progress=cfg.progress and env_rank == 0,
            log=logger.info if env_rank == 0 else None,
        )
    if not isinstance(dataset, (ImageFolderDataset, CachedImageDataset)):
        raise TypeError(f"dataset must be an ImageFolderDataset or a CachedImageDataset, got {type(dataset).__name__}")
    if dataset.channels != cfg.channels or dataset.size != cfg.size:
        raise ValueError(
            f"dataset images are {(dataset.channels, dataset.size, dataset.size)}, expected ({cfg.channels}, {cfg.size}, {cfg.size})"
        )
    info = dist_utils.init_from_env(cfg.device, cfg.dist_timeout)
    device, ws, rank = info.device, info.world_size, info.rank
    n = len(dataset)
    dist_utils.check_same_dataset(n, dataset.fingerprint)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _clean_temp_files(out)
        if cfg.overwrite and previous:
            for name in previous:
                (out / name).unlink(missing_ok=True)
            logger.info("--overwrite: removed the previous run's %d file(s) in %s", len(previous), out)
        (out / "overlays").mkdir(exist_ok=True)
    if val_images is None:
        vi = torch.randperm(n, generator=item_generator(cfg.seed, -3))[: min(cfg.val_images, n)]
        val_images = dataset.read(vi)

    ckpt_path = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    resume_state = None
    if cfg.resume:
        def check(st):
            _validate_resume_state(st, ckpt_path)
            prev = st.get("train_config", {})
            for key in ("size", "channels", "emb_dim", "n_clusters", "batch_size", "seed", "grid"):
                if key in prev and prev[key] != getattr(cfg, key):
                    raise ValueError(
                        f"checkpoint {ckpt_path} was trained with {key}={prev[key]!r}, this run asks for "
                        f"{getattr(cfg, key)!r}; use the same value to resume"
                    )
            if st.get("step", 0) and st.get("world_size") not in (None, ws):
                raise ValueError(
                    f"checkpoint {ckpt_path} is in the middle of an epoch of a run with {st['world_size']} process(es); "
                    f"resume it with the same number of processes (global batch)"
                )

        resume_state = _load_for_all(ckpt_path, check, missing=f"--resume: no checkpoint to resume from at {ckpt_path}")
    records = _read_jsonl(metrics_path) if resume_state is not None else []
    if resume_state is not None:
        done = (resume_state["stage"], resume_state["epoch"])
        records = [r for r in records if (r.get("stage"), r.get("epoch")) <= done]
    else:
        _seed_all(cfg.seed)

    viewgen = LDViewGenerator(cfg.size, AugmentConfig())
    tdtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    criterion = LDCriterion(cfg.loss_impl, cfg.grid)
    gb = cfg.batch_size * ws
    steps = cfg.steps_per_epoch or max(1, n // gb)
    t_start = time.time()
    stopped_early = False
    stage1_state = None
    if cfg.init_stage1 is not None:
        stage1_state = _load_for_all(Path(cfg.init_stage1))["model"]
    model = None
    summary: dict = {"out": str(out), "world_size": ws, "device": str(device)}
    workers = cfg.loader_workers if cfg.loader_workers is not None else _default_loader_workers(device)
    batches = _Batches(dataset, n, gb, cfg.batch_size, rank, cfg.seed, device, workers)
    summary["streaming"] = batches.streaming
    last_save = time.time()

    stages = [(1, cfg.epochs1), (2, cfg.epochs2)]
    if cfg.init_stage1 is not None:
        stages = [(2, cfg.epochs2)]
    for stage, n_epochs in stages:
        if n_epochs == 0:
            continue
        start_epoch, start_step, start_sums = 0, 0, {}
        if resume_state is not None:
            if resume_state["stage"] > stage or (resume_state["stage"] == stage and resume_state["epoch"] >= n_epochs):
                if stage == 1 and resume_state["stage"] == 1:
                    stage1_state = resume_state["model"]
                continue
            if resume_state["stage"] == stage:
                start_epoch = resume_state["epoch"]
                start_step = int(resume_state.get("step", 0))
                start_sums = dict(resume_state.get("sums") or {})
        # --- time budget (--max-minutes): what is left, shared among the remaining epochs;
        # a stage over its share ends after the current epoch and the next stage starts
        stage_t0 = time.time()
        stage_budget = None
        if cfg.max_minutes is not None:
            remaining_epochs = sum(e for st, e in stages if st >= stage)
            left = max(0.0, 60 * cfg.max_minutes - (stage_t0 - t_start))
            stage_budget = left * n_epochs / max(1, remaining_epochs)
        # --- build the model of this stage (deterministic initialisation)
        torch.manual_seed(int(item_generator(cfg.seed, stage, -4).initial_seed()) & ((1 << 62) - 1))
        model = _make_model(cfg, stage)
        if stage == 2 and stage1_state is not None:
            try:
                model.load_stage1(stage1_state)
            except ValueError as exc:
                src = cfg.init_stage1 or "the stage-1 weights of this run"
                raise ValueError(f"cannot start stage 2 from {src}: {exc}") from exc
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        if resume_state is not None and resume_state["stage"] == stage:
            rs = resume_state
            _restore(ckpt_path, "model weights", lambda: model.load_state_dict(rs["model"]))
            _restore(ckpt_path, "optimiser state", lambda: _load_optimizer(opt, rs["optimizer"]))
            _restore(ckpt_path, "learning-rate schedule", lambda: _load_scheduler(sched, rs["scheduler"]))
            if "rng" in rs:
                _restore(ckpt_path, "RNG state", lambda: _set_rng_state(rs["rng"]))
            resume_state = None  # consumed
        elif resume_state is not None and resume_state["stage"] < stage:
            resume_state = None
        model.to(device, dtype=tdtype)
        if ws > 1:
            model = dist_utils.convert_batchnorm(model, device)
            dist_utils.broadcast_module(model)
        model.train()
        # optimiser state tensors must live beside the parameters
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)
        ac, amp_dtype = _autocast(device, cfg.amp)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        for epoch in range(start_epoch, n_epochs):
            t0 = time.time()
            first = start_step if epoch == start_epoch else 0
            sums: dict[str, float] = dict(start_sums) if epoch == start_epoch else {}
            wait0 = batches.wait_s
            bar = _progress(steps, f"stage {stage} epoch {epoch + 1}/{n_epochs}", cfg.progress and info.is_main)
            if bar is not None and first:
                bar.update(first)
            for step, img1, img2 in batches.epoch(stage, epoch, first, steps):
                item_no = step * gb + torch.arange(gb)  # the items' global numbers, as in _batch_indices
                sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                gens = [item_generator(cfg.seed, stage, epoch, step, int(i)) for i in item_no[sl]]
                vb = viewgen(img1.to(tdtype), img2.to(tdtype), gens)
                with ac:
                    z, s = model(vb.images)
                losses = criterion(z, s, vb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                dist_utils.average_gradients(model)
                scaler.step(opt)
                scaler.update()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v / (step + 1):.3f}" for k, v in sums.items()})
                if not math.isfinite(float(losses["loss"].detach())):
                    raise FloatingPointError(f"loss became {float(losses['loss'].detach())} at stage {stage} epoch {epoch + 1} step {step + 1}")
                # --- mid-epoch checkpoint (process 0 only; every --checkpoint-every steps or --checkpoint-minutes)
                done = step + 1
                saved = False
                if info.is_main and done < steps and (
                    (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                    or (cfg.checkpoint_minutes is not None and time.time() - last_save >= 60 * cfg.checkpoint_minutes)
                ):
                    with defer_signals():
                        save_checkpoint(ckpt_path, _train_state(model, opt, sched, cfg, stage, epoch, done, sums, ws))
                    last_save, saved = time.time(), True
                if on_step_end is not None:
                    on_step_end({"stage": stage, "epoch": epoch, "step": done, "checkpointed": saved,
                                 "losses": {k: float(v.detach()) for k, v in losses.items()}})
            if bar is not None:
                bar.close()
            sched.step()
            dt = time.time() - t0
            run_steps = steps - first
            rec = {"stage": stage, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
            rec.update({k: v / steps for k, v in sums.items()})
            rec.update({"steps": steps, "images": 5 * gb * steps, "seconds": round(dt, 3),
                        "images_per_s": round(5 * gb * run_steps / dt, 3), "data_wait_s": round(batches.wait_s - wait0, 4)})
            records.append(rec)
            if info.is_main:
                with defer_signals():  # a Ctrl-C here would break torch.save's zip writer
                    save_checkpoint(ckpt_path, _train_state(model, opt, sched, cfg, stage, epoch + 1, 0, None, ws))
                    _write_jsonl(metrics_path, records)
                last_save = time.time()
                if val_images is not None and len(val_images):
                    save_overlays(_plain_model(model), val_images, out / "overlays" / f"stage{stage}_epoch{epoch + 1:03d}.png")
                logger.info(_epoch_line(rec, n_epochs))
            dist_utils.barrier()
            if on_epoch_end is not None:
                on_epoch_end(rec)
            # stop when another epoch as long as this one would overrun the stage's share
            over = time.time() - stage_t0 + dt > stage_budget if stage_budget is not None else False
            if stage_budget is not None and _agree(over) and epoch + 1 < n_epochs:
                stopped_early = True
                if info.is_main:
                    logger.info(
                        "time budget: stage %d stopped after epoch %d of %d (%.1f of its %.1f min)",
                        stage, epoch + 1, n_epochs, (time.time() - stage_t0) / 60, stage_budget / 60,
                    )
                break
        if info.is_main:
            with defer_signals():
                save_checkpoint(out / f"stage{stage}.pt", {"config": _plain_model(model).config, "model": _unwrap_state(model), "stage": stage})
        stage1_state = _unwrap_state(model) if stage == 1 else stage1_state

    if model is None:  # everything was already done: rebuild the final model from disk
        from .checkpoint import load_model

        last = out / ("stage2.pt" if cfg.epochs2 else "stage1.pt")
        model = load_model(last)
    centre = None
    if info.is_main and cfg.centre_steps:  # stage 3, process 0 only (see its module)
        from .tasks.landmarks.pretrain_stage import run_centre_stage

        model, centre = run_centre_stage(_plain_model(model), dataset, out, cfg.centre_steps, cfg.seed, cfg.progress)
        if centre is not None:
            records = [r for r in records if r.get("stage") != 3] + [{"stage": 3, **centre}]
            _write_jsonl(metrics_path, records)
    if info.is_main:
        with defer_signals():
            final = {"config": _plain_model(model).config, "model": _unwrap_state(model)}
            save_checkpoint(out / "model.pt", {**final, "centre_term": centre} if centre else final)
        if records:
            from . import viz

            try:
                viz.save_loss_curves(records, out / "losses.png")
            except Exception as exc:  # plotting must never lose a finished run
                logger.warning("could not plot losses: %s", exc)
    summary.update(
        {
            "model": str(out / "model.pt"),
            "metrics": str(metrics_path),
            "records": records,
            "seconds": time.time() - t_start,
            "stopped_early": stopped_early,
            "n_images": n,
            "data_wait_s": batches.wait_s,
        }
    )
    summary["final_model"] = _plain_model(model)
    return summary


def _epoch_line(rec: dict, n_epochs: int) -> str:
    """One human-readable line per epoch (the full record goes to metrics.jsonl)."""
    terms = "  ".join(f"{k} {rec[k]:.4f}" for k in ("loss", "pd", "mix", "rd", "ent") if k in rec)
    return (
        f"stage {rec['stage']} epoch {rec['epoch']}/{n_epochs}  {terms}  lr {rec['lr']:.2e}  "
        f"{rec['seconds']:.1f} s ({rec['images_per_s']:.1f} images/s)"
    )


def _train_state(model, opt, sched, cfg: TrainConfig, stage: int, epoch: int, step: int, sums: dict | None, ws: int) -> dict:
    """A training checkpoint: ``epoch`` complete epochs of ``stage`` and ``step`` steps of the next."""
    state = {
        "config": _plain_model(model).config,
        "model": _unwrap_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(),
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "world_size": ws,
        "train_config": _cfg_dict(cfg),
    }
    if step:
        state["sums"] = {k: float(v) for k, v in sums.items()}
    return state


def _agree(flag: bool) -> bool:
    """True on every process if it is true on any (so all processes leave a loop together)."""
    if not dist_utils.is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _plain_model(model) -> LDNet:
    return model.module if hasattr(model, "module") else model


def _unwrap_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in _plain_model(model).state_dict().items()}


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["widths"] = list(cfg.widths)
    d["nifti_axes"] = list(cfg.nifti_axes)
    return d


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- benchmark hook


def synthetic_images(n: int, size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random blob images (n, C, size, size) in [0, 1], for benchmarks and tests."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, channels, size, size, generator=g)
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return (x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)


def make_training_step(
    model: LDNet,
    loss_impl: str = "fused",
    batch_size: int = 4,
    size: int = 128,
    *,
    device: str | torch.device | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    grid: int = 8,
) -> Callable[[], dict[str, float]]:
    """One full LD training step as a callable, for end-to-end step-rate measurements.

    Each call draws B pairs from a fixed pool of synthetic images, makes the 5B views on the
    model's device, runs forward, the LD losses (``loss_impl`` "fused" or "reference"; stage 1 if
    ``model.n_clusters`` is None, else stage 2), backward and an Adam update. Returns the loss
    terms as floats. Images per call: ``5 * batch_size``.
    """
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).train()
    pool = synthetic_images(max(2 * batch_size, 8), size, model.in_channels, seed).to(dev)
    viewgen = LDViewGenerator(size)
    criterion = LDCriterion(loss_impl, grid)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    counter = {"step": 0}

    def step() -> dict[str, float]:
        k = counter["step"]
        counter["step"] += 1
        idx, partner, item_no = _batch_indices(pool.shape[0], 0, 0, k, batch_size, seed)
        gens = [item_generator(seed, 0, 0, k, int(i)) for i in item_no]
        vb = viewgen(pool[idx.to(dev)], pool[partner.to(dev)], gens)
        z, s = model(vb.images)
        losses = criterion(z, s, vb)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return {k2: float(v.detach()) for k2, v in losses.items()}

    step.images_per_call = 5 * batch_size  # type: ignore[attr-defined]
    return step


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH", help="folders (searched recursively) or files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoints, metrics, overlays)")
    parser.add_argument("--size", type=int, default=d.size, help="image size (square) fed to the network")
    parser.add_argument("--channels", type=int, default=d.channels, choices=(1, 3), help="1 = gray, 3 = RGB")
    parser.add_argument("--emb-dim", type=int, default=d.emb_dim, help="D, embedding channels")
    parser.add_argument("--clusters", type=int, default=d.n_clusters, help="K, clusters of stage 2")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="B pairs per process and step (5B images)")
    parser.add_argument("--epochs1", type=int, default=d.epochs1, help="stage-1 epochs (PD + mixup)")
    parser.add_argument("--epochs2", type=int, default=d.epochs2, help="stage-2 epochs (LD)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="steps per epoch (default: images / global batch)")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--lr-step", type=int, default=d.lr_step, help="halve the learning rate every N epochs")
    parser.add_argument("--grid", type=int, default=d.grid, help="G, patch grid for PD/mixup")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice (items, augmentations, init)")
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, default=d.loss_impl, help="fused ld_ext ops or plain PyTorch")
    parser.add_argument("--val-images", type=int, default=d.val_images, help="images in the overlay PNGs")
    parser.add_argument("--nifti-axes", type=int, nargs="+", default=list(d.nifti_axes), help="NIfTI slice axes")
    parser.add_argument("--min-foreground", type=float, default=d.min_foreground, help="skip NIfTI slices with less foreground")
    parser.add_argument("--fit", choices=("pad", "crop"), default=d.fit, help="make images square by padding or cropping")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="training time budget, shared among the remaining epochs; a stage ends early when another "
                        "epoch would overrun its share, and the next stage starts (such a run is not resumable exactly)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt (also from the middle of an epoch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in OUT (without --resume or --overwrite such an OUT is refused)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="where the preprocessed image cache is kept (default OUT/cache); a shared DIR lets runs reuse it")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that build the cache (default: the CPUs, at most 8)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes reading batches from the cache (default: 0 on CPU, i.e. the training process "
                        "reads them; min(4, CPUs/2) on CUDA, with pinned memory)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="also write checkpoint.pt every STEPS steps inside an epoch (0: off)")
    parser.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes, metavar="MIN",
                        help="also write checkpoint.pt inside an epoch when MIN minutes passed since the last one")
    parser.add_argument("--dist-timeout", type=float, default=d.dist_timeout, metavar="SECONDS",
                        help="multi-process runs: how long a process waits for the others (start-up and every collective) "
                        "before stopping with an error")
    parser.add_argument("--init-stage1", default=None, metavar="CKPT",
                        help="skip stage 1: start stage 2 from this stage-1 checkpoint (weights matched by name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                        help="training precision (float64: slow, for verification)")
    from .tasks.landmarks.pretrain_stage import DEFAULT_CENTRE_STEPS

    parser.add_argument("--centre-steps", type=int, default=DEFAULT_CENTRE_STEPS, metavar="N",
                        help="stage 3: N steps of the centre-sensitive landmark term on warps of the same images "
                        "(0: off; process 0 only; not counted in --max-minutes)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=list(args.data), out=args.out, size=args.size, channels=args.channels, emb_dim=args.emb_dim,
        n_clusters=args.clusters, batch_size=args.batch_size, epochs1=args.epochs1, epochs2=args.epochs2,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr, lr_step=args.lr_step, grid=args.grid, seed=args.seed,
        device=args.device, amp=not args.no_amp, loss_impl=args.loss_impl, val_images=args.val_images,
        nifti_axes=tuple(args.nifti_axes), min_foreground=args.min_foreground, fit=args.fit,
        resume=args.resume, overwrite=args.overwrite, max_minutes=args.max_minutes, progress=not args.no_progress,
        init_stage1=args.init_stage1,
        cache=args.cache, workers=args.workers, loader_workers=args.loader_workers, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, dist_timeout=args.dist_timeout, dtype=args.dtype,
        centre_steps=args.centre_steps,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = pretrain(cfg)
    except KeyboardInterrupt:
        if is_main:
            ck = Path(cfg.out) / "checkpoint.pt"
            msg = f"last complete checkpoint: {ck} (continue with --resume)" if ck.exists() else "no epoch was completed"
            print(f"ld-ext: interrupted; {msg}", file=sys.stderr, flush=True)
        return 130
    finally:
        dist_utils.cleanup()
    if is_main:
        note = " (stopped early by the time budget)" if summary["stopped_early"] else ""
        print(
            f"done in {summary['seconds'] / 60:.1f} min{note}: model {summary['model']}, "
            f"metrics {summary['metrics']}",
            flush=True,
        )
    return 0
