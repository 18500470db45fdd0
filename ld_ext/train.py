"""LD pre-training: both stages, exact resume, multi-process on torch.distributed.

``ld-ext pretrain --data PATH... --out DIR`` (or ``pretrain(TrainConfig(...))``):

* stage 1: network without the clustering branch, L = L_pd + L_mix;
* stage 2: the clustering branch is added, every other weight comes from stage 1 (by name),
  L = L_pd + L_mix + 10 L_rd + 0.1 L_ent (docs/method.md sections 5 and 6), ``ld_ext.objective``;
* stage 3 (``centre_steps`` > 0; ``--centre-steps``, on by default on the command line): the
  centre-sensitive landmark term on warps of the same images, process 0 only, ``stage3.pt``
  (``ld_ext.tasks.landmarks.pretrain_stage``; docs/tasks.md).

Beside this module: ``ld_ext.batching`` (the images of each step and process, in memory or
streamed from the cache) and ``ld_ext.train_state`` (checking and restoring a training checkpoint).

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
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import distributed as dist_utils
from .augment import AugmentConfig, LDViewGenerator, item_generator
from .batching import Batches, default_loader_workers
from .checkpoint import LANDMARK_KEY, atomic_write_bytes, defer_signals, remove_stale_temp_files, save_checkpoint
from .data import CachedImageDataset, ImageFolderDataset, Preprocessing, open_or_build_cache
from .models import DEFAULT_WIDTHS, LDNet
from .objective import LOSS_IMPLS, PD_TEMPERATURE, RD_TEMPERATURE, LDObjective
from .train_state import (
    load_for_all,
    load_optimizer,
    load_scheduler,
    restore,
    rng_state,
    seed_all,
    set_rng_state,
    validate_resume_state,
)

__all__ = [
    "TrainConfig",
    "pretrain",
    "predict",
    "save_overlays",
    "add_arguments",
    "config_from_args",
    "run",
]

logger = logging.getLogger(__name__)

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
    rd_temperature: float = RD_TEMPERATURE
    pd_temperature: float = PD_TEMPERATURE
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
        for name in ("rd_temperature", "pd_temperature"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
                raise ValueError(f"{name} must be a positive number, got {t!r}")
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
            validate_resume_state(st, ckpt_path)
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

        resume_state = load_for_all(ckpt_path, check, missing=f"--resume: no checkpoint to resume from at {ckpt_path}")
    records = _read_jsonl(metrics_path) if resume_state is not None else []
    if resume_state is not None:
        done = (resume_state["stage"], resume_state["epoch"])
        records = [r for r in records if (r.get("stage"), r.get("epoch")) <= done]
    else:
        seed_all(cfg.seed)

    viewgen = LDViewGenerator(cfg.size, AugmentConfig())
    tdtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    objective = LDObjective(cfg.loss_impl, cfg.grid, rd_temperature=cfg.rd_temperature,
                            pd_temperature=cfg.pd_temperature, assignment=LDNet.assignment)
    gb = cfg.batch_size * ws
    steps = cfg.steps_per_epoch or max(1, n // gb)
    t_start = time.time()
    stopped_early = False
    stage1_state = None
    if cfg.init_stage1 is not None:
        stage1_state = load_for_all(Path(cfg.init_stage1))["model"]
    model = None
    summary: dict = {"out": str(out), "world_size": ws, "device": str(device)}
    workers = cfg.loader_workers if cfg.loader_workers is not None else default_loader_workers(device)
    batches = Batches(dataset, n, gb, cfg.batch_size, rank, cfg.seed, device, workers)
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
            restore(ckpt_path, "model weights", lambda: model.load_state_dict(rs["model"]))
            restore(ckpt_path, "optimiser state", lambda: load_optimizer(opt, rs["optimizer"]))
            restore(ckpt_path, "learning-rate schedule", lambda: load_scheduler(sched, rs["scheduler"]))
            if "rng" in rs:
                restore(ckpt_path, "RNG state", lambda: set_rng_state(rs["rng"]))
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
                item_no = step * gb + torch.arange(gb)  # the items' global numbers, as in batching.batch_indices
                sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                gens = [item_generator(cfg.seed, stage, epoch, step, int(i)) for i in item_no[sl]]
                vb = viewgen(img1.to(tdtype), img2.to(tdtype), gens)
                with ac:
                    z, s = model(vb.images)
                losses = objective(z, s, vb)
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
    centre = landmark_net = None
    if info.is_main and cfg.centre_steps:  # stage 3, process 0 only (see its module)
        from .tasks.landmarks.pretrain_stage import run_centre_stage

        # stage 3 tunes a copy: the representation (what segmentation, probe and shape-guided read)
        # stays the stage-2 network, and model.pt carries the landmark network beside it
        landmark_net, centre = run_centre_stage(_plain_model(model), dataset, out, cfg.centre_steps, cfg.seed,
                                                cfg.progress)
        if centre is not None:
            records = [r for r in records if r.get("stage") != 3] + [{"stage": 3, **centre}]
            _write_jsonl(metrics_path, records)
        else:
            landmark_net = None
    if info.is_main:
        with defer_signals():
            final = {"config": _plain_model(model).config, "model": _unwrap_state(model)}
            if centre:
                final.update({"centre_term": centre, LANDMARK_KEY: _unwrap_state(landmark_net)})
            save_checkpoint(out / "model.pt", final)
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
    summary["landmark_model"] = landmark_net
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
        "rng": rng_state(),
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
    parser.add_argument("--rd-temperature", type=float, default=d.rd_temperature,
                        help="tau of region discrimination (docs/method.md section 3)")
    parser.add_argument("--pd-temperature", type=float, default=d.pd_temperature,
                        help="T of the patch-discrimination and mixup criterion (section 5)")
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


# TrainConfig fields whose command-line flag is not "--" + the field name with "-" for "_".
_FIELD_FLAGS = {"n_clusters": "--clusters"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The (validated) TrainConfig of ``ld-ext pretrain``'s arguments; a bad value's error names its flag."""
    try:
        return _config_from_args(args).validate()
    except ValueError as exc:
        # The message names config fields ("centre_steps must be ..."); say the flags instead, in the
        # words before the offending value (", got ...").
        msg = str(exc)
        head, sep, tail = msg.partition(", got ")
        names = {f.name for f in dataclass_fields(TrainConfig)}

        def flag(m: re.Match) -> str:
            w = m.group(0)
            if w in _FIELD_FLAGS:
                return _FIELD_FLAGS[w]
            return "--" + w.replace("_", "-") if w in names and hasattr(args, w) else w

        new = re.sub(r"\b[a-z][a-z0-9_]*\b", flag, head) + sep + tail
        if new == msg:
            raise
        raise ValueError(new) from None


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=list(args.data), out=args.out, size=args.size, channels=args.channels, emb_dim=args.emb_dim,
        n_clusters=args.clusters, batch_size=args.batch_size, epochs1=args.epochs1, epochs2=args.epochs2,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr, lr_step=args.lr_step, grid=args.grid,
        rd_temperature=args.rd_temperature, pd_temperature=args.pd_temperature, seed=args.seed,
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
