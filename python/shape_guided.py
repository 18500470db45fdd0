#!/usr/bin/env python
"""Shape-guided cross-modality segmentation (adversarial shape prior on LD cluster 0).

Same flags as `ld-ext shape-guided` (see ld_ext/tasks/shape_guided.py and docs/tasks.md); with
`--demo` it runs the packaged MNI152 demo instead (`ld-ext demo --task shape-guided`).
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
        sys.exit(main(["demo", "--task", "shape-guided", *[a for a in args if a != "--demo"]]))
    sys.exit(main(["shape-guided", *args]))
