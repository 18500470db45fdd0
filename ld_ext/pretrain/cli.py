"""``ld-ext pretrain``: the flags (made from ``TrainConfig``'s fields) and the run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import distributed as dist_utils
from .config import add_config_flags, config_from_args
from .loop import pretrain

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the stage-3 module is imported only here (the library default of centre_steps is 0)
    from ..tasks.landmarks.pretrain_stage import DEFAULT_CENTRE_STEPS

    add_config_flags(parser, cli_defaults={"centre_steps": DEFAULT_CENTRE_STEPS})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = pretrain(cfg)
    except KeyboardInterrupt:
        if is_main:
            ck = Path(cfg.out) / "checkpoint.pt"
            msg = (
                f"last complete checkpoint: {ck} (continue with --resume)" if ck.exists() else "no epoch was completed"
            )
            print(f"ld-ext: interrupted; {msg}", file=sys.stderr, flush=True)
        return 130
    finally:
        dist_utils.cleanup()
    if is_main:
        note = " (stopped early by the time budget)" if summary["stopped_early"] else ""
        print(
            f"done in {summary['seconds'] / 60:.1f} min{note}: model {summary['model']}, metrics {summary['metrics']}",
            flush=True,
        )
    return 0
