"""What the task demos share: the template slices they pre-train on and the progress-bar switch.

``ld_ext.demos.tasks`` (finetune, probe, shape-guided, the shared pre-training) and
``ld_ext.demos.landmark`` both use these, so they live here rather than in either of them.
"""

from __future__ import annotations

__all__ = ["PRETRAIN_Z", "show_progress"]

PRETRAIN_Z = tuple(range(-40, 72, 2))  # mm


def show_progress(args) -> bool:
    """Progress bars unless --no-progress was given."""
    return not getattr(args, "no_progress", False)
