"""Loss modules on top of the fused ops (lightly-style: keyword hyper-parameters, forward -> scalar)."""
from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = ["RegionDiscriminationLoss", "PatchDiscriminationLoss"]


class RegionDiscriminationLoss(nn.Module):
    """Region discrimination loss of LD (LD_METHOD.md section 3), fused.

    Drop-in for the published ``compute_clustering_loss(region_features, attention_map)`` pair:
    give it the raw decoder outputs and it computes the pixel normalisation, the assignment
    normalisation, the region features, the cluster centres (not detached) and the loss, with
    nothing of size N*K*D*P ever allocated.

    Args:
        temperature: tau of the logits <r, c> / tau (default 0.2).
        normalize: L2-normalise the embeddings per pixel inside the kernel.
        assignment: "probs" (use as given), "sigmoid" (raw logits of the clustering branch) or
            "softmax" (softmax over K).
        return_entropy: also return the mean binary entropy of the normalised assignment
            (section 4), computed in the same pass over the pixels.

    ``forward(embeddings (N, D, *spatial), assignments (N, K, *spatial))`` returns the loss, or
    ``(loss_rd, loss_entropy)`` when ``return_entropy=True``.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        normalize: bool = False,
        assignment: str = "probs",
        return_entropy: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = ops._check_temperature(temperature)
        ops._mode(assignment)
        self.normalize = bool(normalize)
        self.assignment = assignment
        self.return_entropy = bool(return_entropy)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, normalize={self.normalize}, "
            f"assignment={self.assignment!r}, return_entropy={self.return_entropy}"
        )

    def forward(self, embeddings: torch.Tensor, assignments: torch.Tensor):
        if self.return_entropy:
            r, ent = ops.region_features_and_entropy(
                embeddings, assignments, normalize=self.normalize, assignment=self.assignment
            )
            return ops.region_discrimination(r, self.temperature), ent
        r = ops.region_features(embeddings, assignments, normalize=self.normalize, assignment=self.assignment)
        return ops.region_discrimination(r, self.temperature)


class PatchDiscriminationLoss(nn.Module):
    """Instance (patch) discrimination criterion of LD's PD and mixup terms (section 5).

    ``forward(x)`` takes (M, D) unit rows with M even; rows i and (i + M/2) mod M are a positive
    pair. Temperature 0.1 by default, negM = 1, stop-gradients as published, computed stably.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = ops._check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.patch_discrimination(x, self.temperature)
