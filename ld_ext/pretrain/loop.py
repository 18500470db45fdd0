"""The pre-training loop, ``pretrain(cfg)``: lock the output folder (a second run into it is
refused while this one lives), refuse or prepare it, check the checkpoint of ``--resume`` (before
anything expensive: the cache is built after it), open the data and log its summary, restore the
checkpoint or seed, run each stage epoch by epoch (checkpoints, metrics, overlays, the time
budget), then stage 3 and ``model.pt``.

The state of one run lives in ``_Run`` and that of one stage in ``_Stage``; the functions below
each do one of the steps, in the order ``_pretrain`` calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as dist_utils
from ..atomic import DISK_ERRNOS, DiskWriteError, FolderInUseError, disk_write_error, lock_folder
from ..augment import LDViewGenerator, VolumeViewGenerator, item_generator
from ..batching import Batches, default_loader_workers
from ..checkpoint import LANDMARK_KEY, defer_signals, load_model, save_checkpoint
from ..data import CachedImageDataset, ImageFolderDataset, mark_output_folder, open_or_build_cache
from ..models import LDNet
from ..objective import LDObjective
from .config import TrainConfig
from .outputs import clean_temp_files, existing_run_files, read_jsonl, save_loss_plot, save_overlays, write_jsonl
from . import volumes
from .state import (
    load_for_all,
    load_optimizer,
    load_scheduler,
    restore,
    rng_state,
    seed_all,
    set_rng_state,
    validate_resume_state,
)

__all__ = ["pretrain"]

logger = logging.getLogger("ld_ext.train")

# train_config entries a resumed run must share with the checkpoint (from nifti_axes on: the data;
# dims is checked first, by volumes.check_resume_dims)
_RESUME_MUST_MATCH = tuple(
    "size channels emb_dim n_clusters batch_size seed grid nifti_axes min_foreground fit spacing window "
    "percentiles".split()
)


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

    Process 0 holds a lock on ``cfg.out`` for the run: another run into the same folder is refused
    with a ``ValueError`` naming the holder. A loss that becomes NaN or infinite stops the run with
    a ``FloatingPointError`` naming the stage, epoch and step; a full disk (or quota, read-only
    file system) is an ``OSError`` naming the file (``atomic.DiskWriteError``).
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


@dataclass
class _Run:
    """What the stages of one run share."""

    cfg: TrainConfig
    out: Path
    dataset: ImageFolderDataset | CachedImageDataset
    n: int
    info: dist_utils.DistInfo
    val_images: torch.Tensor | None
    resume_state: dict | None  # the checkpoint of --resume until its stage has consumed it
    records: list[dict]  # metrics.jsonl
    viewgen: LDViewGenerator | VolumeViewGenerator
    objective: LDObjective
    tdtype: torch.dtype
    gb: int  # global batch (pairs per step over all processes)
    steps: int  # steps per epoch
    t_start: float
    stage1_state: dict | None  # the stage-1 weights stage 2 starts from
    batches: Batches
    last_save: float  # time of the last checkpoint write
    on_epoch_end: Callable[[dict], None] | None = None
    on_step_end: Callable[[dict], None] | None = None
    data_paths: list[str] | None = None  # --data resolved, when the data set was read from it
    model: torch.nn.Module | None = None  # the model of the last stage that ran
    stopped_early: bool = False

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


@dataclass
class _Stage:
    """One stage's model and optimiser and its share of the time budget."""

    stage: int
    n_epochs: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.StepLR
    autocast: object
    scaler: torch.amp.GradScaler
    t0: float
    budget: float | None  # seconds (--max-minutes), None: no budget


def _pretrain(cfg, dataset, val_images, on_epoch_end, on_step_end) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    _check_data_paths(cfg, dataset)  # a mistyped path is reported before anything is written
    info = dist_utils.init_from_env(cfg.device, cfg.dist_timeout)
    with _out_lock(out, info):
        run = _start_run(cfg, out, info, dataset, val_images)
        run.on_epoch_end, run.on_step_end = on_epoch_end, on_step_end
        stages = [(1, cfg.epochs1), (2, cfg.epochs2)]
        if cfg.init_stage1 is not None:
            stages = [(2, cfg.epochs2)]
        for stage, n_epochs in stages:
            if n_epochs == 0:
                continue
            _run_stage(run, stage, n_epochs, stages)
        model = run.model
        if model is None:  # everything was already done: rebuild the final model from disk
            model = load_model(run.out / ("stage2.pt" if cfg.epochs2 else "stage1.pt"))
        landmark_net, run.records = _stage3_and_final_model(
            cfg, run.info, model, run.dataset, run.out, run.records, run.metrics_path
        )
        if run.info.is_main and run.records:
            save_loss_plot(run.records, run.out / "losses.png")
        return _summary(run, model, landmark_net)


# ----------------------------------------------------------------------------- starting a run


@contextlib.contextmanager
def _out_lock(out: Path, info: dist_utils.DistInfo):
    """Process 0 holds the lock of ``out`` for the run (``atomic.lock_folder``); a folder that a
    live run holds is refused on every process, before anything is written into it."""
    lock, refused = None, None
    if info.is_main:
        if out.exists() and not out.is_dir():
            refused = f"out: {out} exists and is not a folder"
        else:
            try:
                lock = lock_folder(out, "--out")
            except FolderInUseError as exc:
                refused = str(exc)
    refused = dist_utils.broadcast_object(refused)
    if refused is not None:
        raise FolderInUseError(refused)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _check_data_paths(cfg: TrainConfig, dataset) -> None:
    if dataset is None:
        if not cfg.data:
            raise ValueError("data: give at least one folder or file (--data PATH ...)")
        for d in cfg.data:
            if not Path(d).exists():
                raise ValueError(f"data path does not exist: {d}")


def _start_run(cfg: TrainConfig, out: Path, info, dataset, val_images) -> _Run:
    """Everything before the first stage: refusals, the checkpoint of --resume, data, output folder."""
    env_rank = int(os.environ.get("RANK", "0"))
    # Refusals first: nothing (not even the cache in OUT/cache) is written before them, and the
    # checkpoint of --resume is checked before the cache is built.
    previous = _refuse_existing_run(cfg, out)
    data_paths = _resolved(cfg.data) if dataset is None else None
    resume_state = _load_resume_state(cfg, out / "checkpoint.pt", info.world_size, dataset) if cfg.resume else None
    try:
        dataset = _open_data(cfg, out, dataset, env_rank)
    except DiskWriteError:
        raise
    except OSError as exc:  # a full disk while building the cache: name the folder
        if exc.errno in DISK_ERRNOS:
            where = exc.filename or (Path(cfg.cache) if cfg.cache else out / "cache")
            raise disk_write_error(exc, where) from exc
        raise
    n, fingerprint = len(dataset), volumes.dataset_fingerprint(dataset)
    if info.is_main:
        for line in volumes.summary_lines(cfg, dataset):
            logger.info(line)
    dist_utils.check_same_dataset(n, fingerprint)
    if resume_state is not None:
        _check_resume_data(resume_state, out / "checkpoint.pt", n, fingerprint)
    if info.is_main:
        _prepare_out(cfg, out, previous)
    if val_images is None:
        val_images = volumes.validation_inputs(cfg, dataset, n)
    records = read_jsonl(out / "metrics.jsonl") if resume_state is not None else []
    if resume_state is not None:
        done = (resume_state["stage"], resume_state["epoch"])
        records = [r for r in records if (r.get("stage"), r.get("epoch")) <= done]
    else:
        seed_all(cfg.seed)
    run = _new_run(cfg, out, dataset, n, info, val_images, resume_state, records)
    run.data_paths = data_paths
    return run


def _refuse_existing_run(cfg: TrainConfig, out: Path) -> list[str]:
    """The files of a previous run in ``out``; refused unless --resume or --overwrite."""
    previous = existing_run_files(out) if out.is_dir() else []
    if previous and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"{out} already holds a run ({shown}); use --resume to continue it, --overwrite to replace it, "
            "or another --out"
        )
    return previous


def _open_data(cfg: TrainConfig, out: Path, dataset, env_rank: int):
    """The given data set, or ``cfg.data`` preprocessed into the cache (built once) and opened
    (volumes: ``volumes.open_volumes``)."""
    if dataset is None and cfg.dims == 3:
        dataset = volumes.open_volumes(cfg, out, env_rank, volumes.lock_timeout_of(cfg))
    if cfg.dims == 3:
        volumes.check_volume_dataset(cfg, dataset)
        return dataset
    if dataset is None:
        _check_data_paths(cfg, dataset)
        cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"
        # outputs are never inputs: --out is marked and skipped by every later scan (its overlays and
        # figure when --out is a data folder itself), and so is the cache; processes waiting for
        # another's cache build give up after --dist-timeout in a multi-process run
        if env_rank == 0:
            mark_output_folder(out, ("overlays", "losses.png", "cache"))
        dataset = open_or_build_cache(
            cfg.data,
            cfg.preprocessing(),
            cache_dir,
            workers=cfg.workers,
            progress=cfg.progress and env_rank == 0,
            log=logger.info if env_rank == 0 else None,
            exclude=[out, out / "overlays", out / "losses.png"],
            lock_timeout=volumes.lock_timeout_of(cfg),
        )
    if not isinstance(dataset, (ImageFolderDataset, CachedImageDataset)):
        raise TypeError(f"dataset must be an ImageFolderDataset or a CachedImageDataset, got {type(dataset).__name__}")
    if dataset.channels != cfg.channels or dataset.size != cfg.size:
        raise ValueError(
            f"dataset images are {(dataset.channels, dataset.size, dataset.size)}, expected ({cfg.channels}, "
            f"{cfg.size}, {cfg.size})"
        )
    return dataset


def _prepare_out(cfg: TrainConfig, out: Path, previous: list[str]) -> None:
    """Process 0: create ``out``, remove temp files of killed writes and (--overwrite) the previous run."""
    out.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    if cfg.overwrite and previous:
        for name in previous:
            (out / name).unlink(missing_ok=True)
        logger.info("--overwrite: removed the previous run's %d file(s) in %s", len(previous), out)
    (out / "overlays").mkdir(exist_ok=True)


def _load_resume_state(cfg: TrainConfig, ckpt_path: Path, ws: int, dataset=None) -> dict:
    """checkpoint.pt of the run to continue, checked against this run's settings and --data (on
    every process), before the data are opened."""

    def check(st):
        validate_resume_state(st, ckpt_path)
        prev = st.get("train_config", {})
        volumes.check_resume_dims(prev, cfg, ckpt_path)
        now = cfg.to_dict()
        for key in _RESUME_MUST_MATCH:
            if key in prev and prev[key] != now.get(key):
                raise ValueError(
                    f"checkpoint {ckpt_path} was trained with {key}={prev[key]!r}, this run asks for "
                    f"{now.get(key)!r}; use the same value to resume"
                )
        data = st.get("data")
        if dataset is None and isinstance(data, dict) and isinstance(data.get("paths"), list):
            if data["paths"] != _resolved(cfg.data):
                raise ValueError(
                    f"checkpoint {ckpt_path} was trained on --data {' '.join(map(str, data['paths']))}, this run "
                    f"gives --data {' '.join(_resolved(cfg.data))}; give the same --data to resume (or --overwrite "
                    "to start a new run)"
                )
        if st.get("step", 0) and st.get("world_size") not in (None, ws):
            raise ValueError(
                f"checkpoint {ckpt_path} is in the middle of an epoch of a run with {st['world_size']} process(es); "
                f"resume it with the same number of processes (global batch)"
            )

    return load_for_all(ckpt_path, check, missing=f"--resume: no checkpoint to resume from at {ckpt_path}")


def _resolved(paths) -> list[str]:
    return [str(Path(p).resolve()) for p in paths]


def _check_resume_data(state: dict, ckpt_path: Path, n: int, fingerprint: str) -> None:
    """The data set opened for --resume against the one the checkpoint was trained on: another
    image count is refused (the epochs would not continue); changed files are a warning."""
    data = state.get("data")
    if not isinstance(data, dict):
        return  # a checkpoint of an older version: nothing to compare
    if isinstance(data.get("n_images"), int) and data["n_images"] != n:
        raise ValueError(
            f"checkpoint {ckpt_path} was trained on {data['n_images']} images, --data now gives {n}; resume with "
            "the same data (or --overwrite to start a new run)"
        )
    if data.get("fingerprint") not in (None, fingerprint):
        logger.warning(
            "the files under --data changed since checkpoint %s was written (same number of images); resuming on them",
            ckpt_path,
        )


def _new_run(cfg: TrainConfig, out: Path, dataset, n: int, info, val_images, resume_state, records) -> _Run:
    """The views, the objective and the batches of the run (after the global RNGs were seeded or restored)."""
    viewgen = volumes.view_generator(cfg)
    tdtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    objective = LDObjective(
        cfg.loss_impl,
        cfg.grid,
        rd_temperature=cfg.rd_temperature,
        pd_temperature=cfg.pd_temperature,
        assignment=LDNet.assignment,
    )
    gb = cfg.batch_size * info.world_size
    steps = cfg.steps_per_epoch or max(1, n // gb)
    t_start = time.time()
    stage1_state = None
    if cfg.init_stage1 is not None:
        stage1_state = load_for_all(Path(cfg.init_stage1))["model"]
    workers = cfg.loader_workers if cfg.loader_workers is not None else default_loader_workers(info.device)
    patch = viewgen.read_size if cfg.dims == 3 else None
    batches = Batches(dataset, n, gb, cfg.batch_size, info.rank, cfg.seed, info.device, workers, patch)
    return _Run(
        cfg=cfg,
        out=out,
        dataset=dataset,
        n=n,
        info=info,
        val_images=val_images,
        resume_state=resume_state,
        records=records,
        viewgen=viewgen,
        objective=objective,
        tdtype=tdtype,
        gb=gb,
        steps=steps,
        t_start=t_start,
        stage1_state=stage1_state,
        batches=batches,
        last_save=time.time(),
    )


# ----------------------------------------------------------------------------- one stage


def _run_stage(run: _Run, stage: int, n_epochs: int, stages: list[tuple[int, int]]) -> None:
    """Train ``stage`` for its remaining epochs (or until its share of the time budget is spent)."""
    start = _stage_start(run, stage, n_epochs)
    if start is None:
        return
    start_epoch, start_step, start_sums = start
    st = _build_stage(run, stage, n_epochs, stages)
    for epoch in range(start_epoch, n_epochs):
        first = start_step if epoch == start_epoch else 0
        sums: dict[str, float] = dict(start_sums) if epoch == start_epoch else {}
        dt = _run_epoch(run, st, epoch, first, sums)
        if _out_of_time(run, st, epoch, dt):
            break
    if run.info.is_main:
        with defer_signals():
            save_checkpoint(
                run.out / f"stage{stage}.pt",
                {"config": _plain_model(st.model).config, "model": _unwrap_state(st.model), "stage": stage},
            )
    run.stage1_state = _unwrap_state(st.model) if stage == 1 else run.stage1_state


def _stage_start(run: _Run, stage: int, n_epochs: int) -> tuple[int, int, dict] | None:
    """(first epoch, first step of it, its loss sums so far) of a stage; None: the checkpoint of
    --resume is past this stage (stage 1's weights then come from it where it holds them)."""
    rs = run.resume_state
    if rs is None:
        return 0, 0, {}
    if rs["stage"] > stage or (rs["stage"] == stage and rs["epoch"] >= n_epochs):
        if stage == 1 and rs["stage"] == 1:
            run.stage1_state = rs["model"]
        return None
    if rs["stage"] == stage:
        return rs["epoch"], int(rs.get("step", 0)), dict(rs.get("sums") or {})
    return 0, 0, {}


def _build_stage(run: _Run, stage: int, n_epochs: int, stages: list[tuple[int, int]]) -> _Stage:
    """The stage's time budget, model (initialised, or restored by --resume), optimiser and scheduler."""
    cfg = run.cfg
    # --- time budget (--max-minutes): what is left, shared among the remaining epochs;
    # a stage over its share ends after the current epoch and the next stage starts
    stage_t0 = time.time()
    stage_budget = None
    if cfg.max_minutes is not None:
        remaining_epochs = sum(e for s, e in stages if s >= stage)
        left = max(0.0, 60 * cfg.max_minutes - (stage_t0 - run.t_start))
        stage_budget = left * n_epochs / max(1, remaining_epochs)
    model = _initial_model(run, stage)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    _restore_stage(run, stage, model, opt, sched)
    model = _place_model(run, model, opt)
    ac, amp_dtype = _autocast(run.info.device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    st = _Stage(stage, n_epochs, model, opt, sched, ac, scaler, stage_t0, stage_budget)
    run.model = model
    return st


def _initial_model(run: _Run, stage: int) -> LDNet:
    """The stage's network, deterministically initialised; stage 2 takes stage 1's weights by name."""
    cfg = run.cfg
    torch.manual_seed(int(item_generator(cfg.seed, stage, -4).initial_seed()) & ((1 << 62) - 1))
    k = cfg.n_clusters if stage == 2 else None
    model = LDNet(cfg.channels, cfg.emb_dim, k, cfg.widths, spatial_dims=cfg.dims)
    if stage == 2 and run.stage1_state is not None:
        try:
            model.load_stage1(run.stage1_state)
        except ValueError as exc:
            src = cfg.init_stage1 or "the stage-1 weights of this run"
            raise ValueError(f"cannot start stage 2 from {src}: {exc}") from exc
    return model


def _restore_stage(run: _Run, stage: int, model: LDNet, opt, sched) -> None:
    """--resume in this stage: weights, optimiser, schedule and RNGs from the checkpoint (then it is
    consumed); a checkpoint of an earlier stage is dropped."""
    rs = run.resume_state
    if rs is not None and rs["stage"] == stage:
        ckpt_path = run.ckpt_path
        restore(ckpt_path, "model weights", lambda: model.load_state_dict(rs["model"]))
        restore(ckpt_path, "optimiser state", lambda: load_optimizer(opt, rs["optimizer"]))
        restore(ckpt_path, "learning-rate schedule", lambda: load_scheduler(sched, rs["scheduler"]))
        if "rng" in rs:
            restore(ckpt_path, "RNG state", lambda: set_rng_state(rs["rng"]))
        run.resume_state = None  # consumed
    elif rs is not None and rs["stage"] < stage:
        run.resume_state = None


def _place_model(run: _Run, model: LDNet, opt) -> torch.nn.Module:
    """The model on the device in the training precision (synchronised over processes), in train mode."""
    device = run.info.device
    model.to(device, dtype=run.tdtype)
    if run.info.world_size > 1:
        model = dist_utils.convert_batchnorm(model, device)
        dist_utils.broadcast_module(model)
    model.train()
    # optimiser state tensors must live beside the parameters
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
    return model


def _out_of_time(run: _Run, st: _Stage, epoch: int, dt: float) -> bool:
    """Stop the stage when another epoch as long as this one would overrun its share of the budget
    (decided on all processes together)."""
    over = time.time() - st.t0 + dt > st.budget if st.budget is not None else False
    if st.budget is not None and _agree(over) and epoch + 1 < st.n_epochs:
        run.stopped_early = True
        if run.info.is_main:
            logger.info(
                "time budget: stage %d stopped after epoch %d of %d (%.1f of its %.1f min)",
                st.stage,
                epoch + 1,
                st.n_epochs,
                (time.time() - st.t0) / 60,
                st.budget / 60,
            )
        return True
    return False


# ----------------------------------------------------------------------------- one epoch


def _run_epoch(run: _Run, st: _Stage, epoch: int, first: int, sums: dict[str, float]) -> float:
    """Steps ``first ..`` of one epoch, then its record, checkpoint, overlays; returns its seconds."""
    t0 = time.time()
    wait0 = run.batches.wait_s
    bar = _step_progress_bar(
        run.steps, f"stage {st.stage} epoch {epoch + 1}/{st.n_epochs}", run.cfg.progress and run.info.is_main
    )
    if bar is not None and first:
        bar.update(first)
    for step, img1, img2 in run.batches.epoch(st.stage, epoch, first, run.steps):
        losses = _train_step(run, st, epoch, step, img1, img2)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v / (step + 1):.3f}" for k, v in sums.items()})
        if not math.isfinite(float(losses["loss"].detach())):
            raise _non_finite_loss(run, st, epoch, step, float(losses["loss"].detach()))
        done = step + 1
        saved = _mid_epoch_checkpoint(run, st, epoch, done, sums)
        if run.on_step_end is not None:
            run.on_step_end(
                {
                    "stage": st.stage,
                    "epoch": epoch,
                    "step": done,
                    "checkpointed": saved,
                    "losses": {k: float(v.detach()) for k, v in losses.items()},
                }
            )
    if bar is not None:
        bar.close()
    st.sched.step()
    dt = time.time() - t0
    rec = _epoch_record(run, st, epoch, first, sums, dt, run.batches.wait_s - wait0)
    run.records.append(rec)
    _end_epoch(run, st, epoch, rec)
    return dt


def _non_finite_loss(run: _Run, st: _Stage, epoch: int, step: int, value: float) -> FloatingPointError:
    """The error of a loss that became NaN or infinite: where, what to try, what is left on disk."""
    cfg = run.cfg
    kept = (
        f"the last complete checkpoint is {run.ckpt_path}"
        if run.ckpt_path.exists()
        else "no checkpoint was written before it"
    )
    amp = ", or --no-amp" if cfg.amp and run.info.device.type == "cuda" else ""
    return FloatingPointError(
        f"the loss became {value} at stage {st.stage} epoch {epoch + 1}/{st.n_epochs} step {step + 1}/{run.steps}; "
        f"try a lower --lr (now {cfg.lr:g}), check the data for extreme values or constant images, "
        f"or --dtype float64{amp}; {kept}"
    )


def _train_step(run: _Run, st: _Stage, epoch: int, step: int, img1: torch.Tensor, img2: torch.Tensor) -> dict:
    """One optimiser step on this process's share of the step's pairs; returns the loss terms."""
    cfg, gb, rank = run.cfg, run.gb, run.info.rank
    item_no = step * gb + torch.arange(gb)  # the items' global numbers, as in batching.batch_indices
    sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    gens = [item_generator(cfg.seed, st.stage, epoch, step, int(i)) for i in item_no[sl]]
    vb = run.viewgen(img1.to(run.tdtype), img2.to(run.tdtype), gens)
    with st.autocast:
        z, s = st.model(vb.images)
    losses = run.objective(z, s, vb)
    st.opt.zero_grad(set_to_none=True)
    st.scaler.scale(losses["loss"]).backward()
    dist_utils.average_gradients(st.model)
    st.scaler.step(st.opt)
    st.scaler.update()
    return losses


def _mid_epoch_checkpoint(run: _Run, st: _Stage, epoch: int, done: int, sums: dict) -> bool:
    """Process 0, inside an epoch: checkpoint.pt every --checkpoint-every steps or --checkpoint-minutes.
    Returns whether it was written."""
    cfg = run.cfg
    if (
        run.info.is_main
        and done < run.steps
        and (
            (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            or (cfg.checkpoint_minutes is not None and time.time() - run.last_save >= 60 * cfg.checkpoint_minutes)
        )
    ):
        with defer_signals():
            save_checkpoint(run.ckpt_path, _train_state(run, st, epoch, done, sums))
        run.last_save = time.time()
        return True
    return False


def _epoch_record(run: _Run, st: _Stage, epoch: int, first: int, sums: dict, dt: float, wait_s: float) -> dict:
    """The epoch's line of metrics.jsonl (mean loss terms, throughput)."""
    steps, gb = run.steps, run.gb
    run_steps = steps - first
    rec = {"stage": st.stage, "epoch": epoch + 1, "lr": st.opt.param_groups[0]["lr"]}
    rec.update({k: v / steps for k, v in sums.items()})
    rec.update(
        {
            "steps": steps,
            "images": 5 * gb * steps,
            "seconds": round(dt, 3),
            "images_per_s": round(5 * gb * run_steps / dt, 3),
            "data_wait_s": round(wait_s, 4),
        }
    )
    return rec


def _end_epoch(run: _Run, st: _Stage, epoch: int, rec: dict) -> None:
    """Process 0: checkpoint.pt, metrics.jsonl, the overlays and the log line; then all processes meet."""
    if run.info.is_main:
        with defer_signals():  # a Ctrl-C here would break torch.save's zip writer
            save_checkpoint(run.ckpt_path, _train_state(run, st, epoch + 1, 0, None))
            write_jsonl(run.metrics_path, run.records)
        run.last_save = time.time()
        if run.val_images is not None and len(run.val_images):
            save_overlays(
                _plain_model(st.model),
                run.val_images,
                run.out / "overlays" / f"stage{st.stage}_epoch{epoch + 1:03d}.png",
            )
        logger.info(_epoch_line(rec, st.n_epochs))
    dist_utils.barrier()
    if run.on_epoch_end is not None:
        run.on_epoch_end(rec)


def _epoch_line(rec: dict, n_epochs: int) -> str:
    """One human-readable line per epoch (the full record goes to metrics.jsonl)."""
    terms = "  ".join(f"{k} {rec[k]:.4f}" for k in ("loss", "pd", "mix", "rd", "ent") if k in rec)
    return (
        f"stage {rec['stage']} epoch {rec['epoch']}/{n_epochs}  {terms}  lr {rec['lr']:.2e}  "
        f"{rec['seconds']:.1f} s ({rec['images_per_s']:.1f} images/s)"
    )


def _train_state(run: _Run, st: _Stage, epoch: int, step: int, sums: dict | None) -> dict:
    """A training checkpoint: ``epoch`` complete epochs of the stage and ``step`` steps of the next."""
    state = {
        "config": _plain_model(st.model).config,
        "model": _unwrap_state(st.model),
        "optimizer": st.opt.state_dict(),
        "scheduler": st.sched.state_dict(),
        "rng": rng_state(),
        "stage": st.stage,
        "epoch": epoch,
        "step": step,
        "world_size": run.info.world_size,
        "train_config": run.cfg.to_dict(),
        "data": {"paths": run.data_paths, "n_images": run.n, "fingerprint": volumes.dataset_fingerprint(run.dataset)},
    }
    if step:
        state["sums"] = {k: float(v) for k, v in sums.items()}
    return state


# ----------------------------------------------------------------------------- the end of a run


def _stage3_and_final_model(cfg, info, model, dataset, out, records, metrics_path):
    """Stage 3 (process 0, ``cfg.centre_steps`` > 0; its record joins metrics.jsonl) and model.pt.
    Returns the landmark network (None without stage 3) and the records.

    Stage 3 tunes a copy: the representation (``"model"`` of model.pt, what segmentation, probe
    and shape-guided read) stays the stage-2 network, and model.pt carries the landmark network
    beside it (``LANDMARK_KEY``, what ``ld-ext landmark`` reads)."""
    centre = landmark_net = None
    if info.is_main and cfg.centre_steps and cfg.dims == 3:
        logger.info("stage 3 (the centre-sensitive landmark term) is 2-D only: skipped with --dims 3")
    elif info.is_main and cfg.centre_steps:  # stage 3, process 0 only (see its module)
        from ..tasks.landmarks.pretrain_stage import run_centre_stage

        tuned, centre = run_centre_stage(_plain_model(model), dataset, out, cfg.centre_steps, cfg.seed, cfg.progress)
        if centre is not None:
            landmark_net = tuned
            records = [r for r in records if r.get("stage") != 3] + [{"stage": 3, **centre}]
            write_jsonl(metrics_path, records)
    if info.is_main:
        with defer_signals():
            final = {"config": _plain_model(model).config, "model": _unwrap_state(model), "train_config": cfg.to_dict()}
            if centre:
                final.update({"centre_term": centre, LANDMARK_KEY: _unwrap_state(landmark_net)})
            save_checkpoint(out / "model.pt", final)
    return landmark_net, records


def _summary(run: _Run, model, landmark_net=None) -> dict:
    summary: dict = {"out": str(run.out), "world_size": run.info.world_size, "device": str(run.info.device)}
    summary["streaming"] = run.batches.streaming
    summary.update(
        {
            "model": str(run.out / "model.pt"),
            "metrics": str(run.metrics_path),
            "records": run.records,
            "seconds": time.time() - run.t_start,
            "stopped_early": run.stopped_early,
            "n_images": run.n,
            "data_wait_s": run.batches.wait_s,
        }
    )
    summary["final_model"] = _plain_model(model)
    summary["landmark_model"] = landmark_net
    return summary


# ----------------------------------------------------------------------------- small helpers


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return torch.autocast(device.type, enabled=False), None


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


def _step_progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
