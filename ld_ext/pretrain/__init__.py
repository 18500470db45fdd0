"""LD pre-training: both stages, exact resume, multi-process on torch.distributed.

``ld-ext pretrain --data PATH... --out DIR`` (or ``pretrain(TrainConfig(...))``):

* stage 1: network without the clustering branch, L = L_pd + L_mix;
* stage 2: the clustering branch is added, every other weight comes from stage 1 (by name),
  L = L_pd + L_mix + 10 L_rd + 0.1 L_ent (docs/method.md sections 5 and 6), ``ld_ext.objective``;
* stage 3 (``centre_steps`` > 0; ``--centre-steps``, on by default on the command line): the
  centre-sensitive landmark term on warps of the same images, process 0 only, ``stage3.pt``
  (``ld_ext.tasks.landmarks.pretrain_stage``; docs/tasks.md).

The package: ``config`` (``TrainConfig``; the command-line flags are made from its fields),
``loop`` (``pretrain``, the loop in small steps), ``outputs`` (the files of a run: metrics,
overlays, loss curves), ``state`` (checking and restoring a training checkpoint, the global
RNGs), ``cli`` (``ld-ext pretrain``). Beside it: ``ld_ext.batching`` (the images of each step and
process, in memory or streamed from the cache). ``ld_ext.train`` re-exports the public names.

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

from .cli import add_arguments, run
from .config import TrainConfig, config_from_args
from .loop import pretrain
from .outputs import RUN_FILES, existing_run_files, predict, save_overlays

__all__ = [
    "TrainConfig",
    "pretrain",
    "predict",
    "save_overlays",
    "add_arguments",
    "config_from_args",
    "run",
    "RUN_FILES",
    "existing_run_files",
]
