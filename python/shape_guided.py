#!/usr/bin/env python
"""Shape-guided cross-modality segmentation (adversarial shape prior on LD cluster 0).

Same flags as `ld-ext shape-guided` (see ld_ext/tasks/shape_guided.py and docs/tasks.md); with
`--demo` it runs the packaged MNI152 demo instead (`ld-ext demo --task shape-guided`).
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
        return demos.run_task_demo("shape-guided", parser.parse_args(argv))
    from ld_ext.tasks import shape_guided

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_guided.add_arguments(parser)
    return shape_guided.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
