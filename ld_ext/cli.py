"""The ``ld-ext`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together.
A subcommand whose module is not present is left out of the command."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "pretrain": ("ld_ext.train", "pre-train an LD network (both stages) on a folder of medical images"),
    "demo": ("ld_ext.demo", "pre-train on the MNI152 template shipped in nilearn and score the clusters"),
    "bench": ("ld_ext.bench", "benchmark the fused ops against plain PyTorch"),
    "finetune": ("ld_ext.tasks.segmentation", "transfer to segmentation (LD init vs random init)"),
    "probe": ("ld_ext.tasks.probe", "linear probe of frozen features (LD vs random-init, intensity, position)"),
    "landmark": ("ld_ext.tasks.landmarks", "centre-sensitive one-shot landmark localisation"),
    "shape-guided": ("ld_ext.tasks.shape_guided", "shape-guided cross-modality segmentation"),
    "info": ("ld_ext.cli", "print build facts (CUDA compiled?, CPU ISA, torch versions)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for "info"
    pass


def run(args: argparse.Namespace) -> int:  # for "info"
    import json

    from .ops import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ld-ext", description="Local Discrimination (LD) with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
