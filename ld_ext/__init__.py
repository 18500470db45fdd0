"""ld_ext: fused C++/CUDA kernels and a complete pipeline for Local Discrimination (LD).

Chen et al., "Unsupervised Local Discrimination for Medical Images" (arXiv 2108.09440).
"""
import logging as _logging

from . import reference
from ._version import __version__
from .losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from .ops import (
    build_info,
    patch_discrimination,
    pixel_cluster_similarity,
    region_discrimination,
    region_features,
    region_features_and_entropy,
)

# Library code reports through logging (logger "ld_ext"); it prints nothing unless the program
# configures logging (the ld-ext command does).
_logging.getLogger("ld_ext").addHandler(_logging.NullHandler())

__all__ = [
    "RegionDiscriminationLoss",
    "PatchDiscriminationLoss",
    "region_features",
    "region_features_and_entropy",
    "region_discrimination",
    "pixel_cluster_similarity",
    "patch_discrimination",
    "build_info",
    "reference",
    "__version__",
]
