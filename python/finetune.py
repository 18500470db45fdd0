#!/usr/bin/env python
"""Segmentation transfer: LD initialisation vs random initialisation (soft Dice, held-out Dice).

Same flags as `ld-ext finetune` (see ld_ext/tasks/segmentation.py and docs/tasks.md); with
`--demo` it runs the packaged MNI152 demo instead (`ld-ext demo --task finetune`).
"""
import sys
from pathlib import Path

try:  # a source checkout: make the in-place package importable
    import ld_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ld_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--demo" in args:
        sys.exit(main(["demo", "--task", "finetune", *[a for a in args if a != "--demo"]]))
    sys.exit(main(["finetune", *args]))
