"""What the task demos share: the template slices they pre-train on and the progress-bar switch.

``ld_ext.demos.tasks`` (finetune, probe, shape-guided, the shared pre-training) and
``ld_ext.demos.landmark`` both use these, so they live here rather than in either of them.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PRETRAIN_Z", "show_progress", "demo_threads"]

PRETRAIN_Z = tuple(range(-40, 72, 2))  # mm


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
