"""What the demos share: the template slices the task demos pre-train on, the progress-bar switch, the
CPU threads and the marker of a flag left out (``DemoDefault``).

``ld_ext.demos.tasks`` (finetune, probe, shape-guided, the shared pre-training) and
``ld_ext.demos.landmark`` both use these, so they live here rather than in either of them.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PRETRAIN_Z", "DemoDefault", "plain_defaults", "show_progress", "demo_threads"]

PRETRAIN_Z = tuple(range(-40, 72, 2))  # mm


class DemoDefault(int):
    """The default of a flag that the 2-D and the 3-D demo share with different values: it equals the
    2-D value, and its type says that the flag was left out (argparse keeps a default object as it is,
    a value given on the command line is a plain int), so ``--dims 3`` puts its own value there."""


def plain_defaults(args) -> None:
    """Every ``DemoDefault`` left in ``args`` made a plain int (nothing of this type reaches a checkpoint,
    which is read weights-only)."""
    for name, value in vars(args).items():
        if isinstance(value, DemoDefault):
            setattr(args, name, int(value))


def show_progress(args) -> bool:
    """Progress bars unless --no-progress was given."""
    return not getattr(args, "no_progress", False)


def demo_threads(requested: int | None) -> tuple[int, str]:
    """(torch CPU threads, why): ``requested`` (--threads) when given; otherwise the cores the machine
    has free by its 1-minute load average, at least 1. On a busy 2-core machine one thread is about
    twice as fast as two (measured at load 10: 5 s against 11 s per training step), since two threads
    that wait for each other lose whenever the other programs take one of the cores."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads must be an int >= 1, got {requested!r}")
        return requested, "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        return torch.get_num_threads(), "torch's default"
    n = max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))
    return n, f"load average {load:.1f} on {cores} cores; --threads N to choose"
