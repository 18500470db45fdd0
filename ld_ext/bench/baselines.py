"""The plain-PyTorch twins of the drop-in loss modules: the comparison baseline of the benchmarks.

They live in the losses layer (``ld_ext.plain_losses``), since ``LDObjective(loss_impl="reference")``
trains with them too; the benchmarks (the end-to-end step, ``ld_ext.bench``) import them from
here, beside their other baselines.
"""

from __future__ import annotations

from ..plain_losses import PlainPatchDiscriminationLoss, PlainRegionDiscriminationLoss

__all__ = ["PlainRegionDiscriminationLoss", "PlainPatchDiscriminationLoss"]
