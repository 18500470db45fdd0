"""The plain-PyTorch twins of the drop-in loss modules: the comparison baseline of the benchmarks.

``PlainRegionDiscriminationLoss`` and ``PlainPatchDiscriminationLoss`` take the arguments of
``ld_ext.RegionDiscriminationLoss`` / ``ld_ext.PatchDiscriminationLoss`` and gather over
processes the same way (they inherit ``forward``); only the math is replaced by the efficient
eager formulation of ``ld_ext.reference`` (batched matmul, stable criterion). Low-precision
inputs are computed in float32, as the fused ops do. ``LDObjective(loss_impl="reference")`` and
the end-to-end benchmark train with these.
"""
from __future__ import annotations

import torch

from .. import reference as ref
from ..losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from ..normalization import compute_dtype

__all__ = ["PlainRegionDiscriminationLoss", "PlainPatchDiscriminationLoss"]



class PlainRegionDiscriminationLoss(RegionDiscriminationLoss):
    """``RegionDiscriminationLoss`` in plain PyTorch (``reference.region_features_bmm`` etc.)."""

    def features(self, embeddings: torch.Tensor, assignments: torch.Tensor):
        e, s = compute_dtype(embeddings), compute_dtype(assignments)
        r = ref.region_features_bmm(e, s, normalize=self.normalize, assignment=self.assignment)
        return r, (ref.assignment_entropy(s, self.assignment) if self.return_entropy else None)

    def discrimination(self, feats: torch.Tensor) -> torch.Tensor:
        return ref.region_discrimination(feats, self.temperature)


class PlainPatchDiscriminationLoss(PatchDiscriminationLoss):
    """``PatchDiscriminationLoss`` in plain PyTorch (``reference.patch_discrimination``)."""

    def criterion(self, x: torch.Tensor) -> torch.Tensor:
        return ref.patch_discrimination(compute_dtype(x), self.temperature)
