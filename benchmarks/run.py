#!/usr/bin/env python
"""Benchmark the fused ld_ext ops against plain PyTorch: ``python benchmarks/run.py [--quick] [--device cuda] [--out DIR]``.

A thin wrapper of ``ld_ext.bench`` (the same as ``ld-ext bench``); see benchmarks/README.md.
It uses the ld_ext of this checkout when its compiled kernels are built in place, else the
installed ld_ext.
"""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_bench():
    in_place = glob.glob(os.path.join(ROOT, "ld_ext", "_C*.so")) + glob.glob(os.path.join(ROOT, "ld_ext", "_C*.pyd"))
    if in_place:
        sys.path.insert(0, ROOT)
    try:
        from ld_ext import bench
    except ImportError:
        if in_place or not os.path.isfile(os.path.join(ROOT, "ld_ext", "__init__.py")):
            raise
        sys.path.insert(0, ROOT)  # not installed: let the checkout's import error explain what is missing
        for name in [m for m in sys.modules if m == "ld_ext" or m.startswith("ld_ext.")]:
            del sys.modules[name]
        from ld_ext import bench
    return bench


if __name__ == "__main__":
    sys.exit(_import_bench().main())
