#!/usr/bin/env python
"""Pre-train LD on the MNI152 template shipped inside nilearn (CPU, a few minutes) and score its clusters.

    python python/demo.py [--out ld_demo] [--max-minutes 7]

Writes a checkpoint, metrics, overlays and an NMI table (LD vs untrained network vs k-means) to --out.
"""
import sys
from pathlib import Path

try:  # a source checkout: make the in-place package importable
    import ld_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ld_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
