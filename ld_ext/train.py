"""The pre-training API under its earlier name: ``ld_ext.train`` re-exports the public names of
``ld_ext.pretrain`` (the package that holds the trainer, its configuration and ``ld-ext pretrain``),
so that code written against ``ld_ext.train`` keeps working. Its progress still goes to the
logger ``ld_ext.train``."""

from __future__ import annotations

from .pretrain import (
    RUN_FILES,
    TrainConfig,
    add_arguments,
    config_from_args,
    existing_run_files,
    predict,
    pretrain,
    run,
    save_overlays,
)

__all__ = [
    "TrainConfig",
    "pretrain",
    "predict",
    "save_overlays",
    "add_arguments",
    "config_from_args",
    "run",
    "RUN_FILES",
    "existing_run_files",
]
