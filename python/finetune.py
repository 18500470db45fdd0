#!/usr/bin/env python
"""Segmentation transfer: LD initialisation vs random initialisation (soft Dice, held-out Dice).

Same flags as `ld-ext finetune` (see ld_ext/tasks/segmentation.py and docs/tasks.md); with
`--demo` it runs the packaged MNI152 demo instead (`ld-ext demo --task finetune`).
"""
import argparse
import sys
from pathlib import Path

try:  # a source checkout: make the in-place package importable
    import ld_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        from ld_ext.tasks import demos

        argv.remove("--demo")
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " (MNI152 demo)")
        demos.add_task_arguments(parser)
        return demos.run_task_demo("finetune", parser.parse_args(argv))
    from ld_ext.tasks import segmentation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    segmentation.add_arguments(parser)
    return segmentation.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
