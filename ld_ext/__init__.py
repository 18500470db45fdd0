"""ld_ext: fused C++/CUDA kernels and a complete pipeline for Local Discrimination (LD).

Chen et al., "Unsupervised Local Discrimination for Medical Images" (arXiv 2108.09440).
"""
from . import reference
from .losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from .ops import (
    build_info,
    patch_discrimination,
    pixel_cluster_similarity,
    region_discrimination,
    region_features,
    region_features_and_entropy,
)

__version__ = "0.1.0"

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
