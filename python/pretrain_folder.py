#!/usr/bin/env python
"""Pre-train an LD network (both stages) on a folder of medical images.

    python python/pretrain_folder.py --data /path/to/images --out runs/my_run [--epochs1 20 --epochs2 80 ...]

Accepts every flag of ``ld-ext pretrain`` (see ``--help``); the folder is searched recursively for
PNG/JPEG/TIFF, DICOM and NIfTI files. Multi-process: ``torchrun --nproc_per_node 2 python/pretrain_folder.py ...``.
"""
import sys
from pathlib import Path

try:  # a source checkout: make the in-place package importable
    import ld_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ld_ext.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
