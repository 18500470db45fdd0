"""ld_ext: fused C++/CUDA kernels and a complete pipeline for Local Discrimination (LD).

Chen et al., "Unsupervised Local Discrimination for Medical Images" (arXiv 2108.09440).
"""

from . import _startup  # noqa: F401, I001  (first of all: the ld-ext command's Ctrl-C guard, ld_ext/_startup.py)

import logging as _logging
from . import reference
from ._version import __version__
from .losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from .ops import api as _api
from .ops.api import *  # noqa: F403  (the public op functions; ld_ext.ops.api.__all__ is their one list)

# Library code reports through logging (logger "ld_ext"); it prints nothing unless the program
# configures logging (the ld-ext command does).
_logging.getLogger("ld_ext").addHandler(_logging.NullHandler())

__all__ = ["RegionDiscriminationLoss", "PatchDiscriminationLoss", *_api.__all__, "reference", "__version__"]
