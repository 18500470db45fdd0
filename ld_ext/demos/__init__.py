"""``ld-ext demo``: every demo of ld_ext, on medical images that ship inside the nilearn package
(nothing is downloaded).

* ``ld_ext.demos.mni``: the MNI152 data (template, tissue maps, small structures, landmarks);
  the one MNI152 loader of ld_ext.
* ``ld_ext.demos.pretrain``: ``ld-ext demo`` (``--task pretrain``, the default): LD pre-training
  on the template for a fixed number of steps (stages 1-3), then the linear-probe table of small
  structures on held-out slices (``ld_ext.demos.probe_table``) and the NMI table of its clusters,
  under one progress line (``ld_ext.demos.progress``).
* ``ld_ext.demos.volumes3d``: ``ld-ext demo --dims 3``: LD pre-training on volumes (random warped
  copies of the template, ``ld_ext.demos.warps3d``) and the probe of the small structures on held-out
  copies.
* ``ld_ext.demos.tasks``: ``ld-ext demo --task finetune|probe|shape-guided``, and the shared
  short pre-training of the task demos; ``ld_ext.demos.landmark``: ``--task landmark``.

``add_arguments`` / ``run`` are the subcommand's entry points (``ld_ext.cli``).
"""

from __future__ import annotations

import argparse

from . import tasks
from .mni import STRUCTURES, load_mni_slices, mni_files, mni_volume, tissue_labels
from .pretrain import (
    add_pretrain_demo_arguments,
    kmeans_1d,
    nmi_sentence,
    normalized_mutual_info,
    run_pretrain_demo,
    score_methods,
)
from .probe_table import probe_scores
from .tasks import TASKS, add_task_arguments, run_task_demo
from .volumes3d import add_volume_demo_arguments, run_volume_demo

__all__ = [
    "STRUCTURES",
    "TASKS",
    "mni_files",
    "mni_volume",
    "load_mni_slices",
    "tissue_labels",
    "normalized_mutual_info",
    "kmeans_1d",
    "score_methods",
    "probe_scores",
    "nmi_sentence",
    "add_pretrain_demo_arguments",
    "add_task_arguments",
    "run_pretrain_demo",
    "run_task_demo",
    "add_volume_demo_arguments",
    "run_volume_demo",
    "add_arguments",
    "run",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("pretrain",) + TASKS,
        default="pretrain",
        help="pretrain (default): LD pre-training + cluster scores; or a downstream-task demo "
        "(give --checkpoint OUT/model.pt of a pretrain demo to skip its own pre-training)",
    )
    add_pretrain_demo_arguments(parser)
    add_volume_demo_arguments(parser)
    add_task_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "dims", 2) == 3:
        run_volume_demo(args)
        return 0
    if getattr(args, "task", "pretrain") != "pretrain":
        return int(tasks.run_task_demo(args.task, args) or 0)  # looked up at call time (tests replace it)
    run_pretrain_demo(args)
    return 0
