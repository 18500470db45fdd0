"""The compiled library: loading ``ld_ext._C`` registers the operators ``torch.ops.ld_ext.*``
(schemas in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda). Every module of ld_ext.ops gets
``_C`` and the operator namespace ``ops`` from here, so a broken install fails in one place, with
the build hint."""

from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ld_ext's compiled kernels (ld_ext._C) could not be loaded. Build them with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` for a "
        f"development checkout). Original error: {exc}"
    ) from exc

__all__ = ["_C", "ops"]

ops = torch.ops.ld_ext
