"""Downstream tasks of LD (docs/method.md section 8): segmentation transfer (``segmentation``),
centre-sensitive one-shot landmark localisation (``landmarks``), shape-guided cross-modality
segmentation (``shape_guided``), the linear probe (``probe``) and their shared pieces
(``common``); their demos on data shipped with nilearn are ``ld_ext.demos``.
Each task module provides ``add_arguments(parser)`` and ``run(args) -> int`` for ``ld-ext``."""
