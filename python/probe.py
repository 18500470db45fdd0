#!/usr/bin/env python
"""Linear probe of frozen per-pixel features: LD vs random-init network, intensity and position.

Same flags as `ld-ext probe` (see ld_ext/tasks/probe.py and docs/tasks.md section 4); with
`--demo` it runs the packaged MNI152 protocol instead (`ld-ext demo --task probe`).
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
        sys.exit(main(["demo", "--task", "probe", *[a for a in args if a != "--demo"]]))
    sys.exit(main(["probe", *args]))
