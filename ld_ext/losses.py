"""Loss modules on top of the fused ops (lightly-style: keyword hyper-parameters, forward -> scalar).

``gather_distributed=True`` (as in lightly): under torch.distributed each process all-gathers the
per-image terms (region features, PD rows) with gradients, so the cluster centres and the
negatives come from the global batch. Every process then computes the same global loss; the
gather's backward sums the gradients over processes, so after DDP's gradient averaging the update
equals that of one process on the concatenated batch. All processes must call the loss with the
same shapes.

Each module keeps its math in small methods (``RegionDiscriminationLoss.features`` /
``.discrimination``, ``PatchDiscriminationLoss.criterion``) and its checks and gathering in
``forward``; their plain-PyTorch twins (``ld_ext.plain_losses``: ``--loss-impl reference`` and the
benchmarks' baseline) override only the math.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed as _dist
from . import ops
from .ops.checks import assignment_mode, check_temperature


__all__ = ["RegionDiscriminationLoss", "PatchDiscriminationLoss"]


def _gather(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return _dist.all_gather_with_grad(x, dim=0) if enabled else x


class RegionDiscriminationLoss(nn.Module):
    """Region discrimination loss of LD (docs/method.md section 3), fused.

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
        gather_distributed: under torch.distributed, compute the centres and the loss over the
            region features of every process (all-gathered with gradients). Without a process
            group it changes nothing.

    ``forward(embeddings (N, D, *spatial), assignments (N, K, *spatial))`` returns the loss, or
    ``(loss_rd, loss_entropy)`` when ``return_entropy=True``.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        normalize: bool = False,
        assignment: str = "probs",
        return_entropy: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        assignment_mode(assignment)  # refuses an unknown mode here, not at the first call
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        self.normalize = bool(normalize)
        self.assignment = assignment
        self.return_entropy = bool(return_entropy)
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, normalize={self.normalize}, "
            f"assignment={self.assignment!r}, return_entropy={self.return_entropy}, "
            f"gather_distributed={self.gather_distributed}"
        )

    def features(self, embeddings: torch.Tensor, assignments: torch.Tensor):
        """(region features (N, K, D), mean entropy or None) of this process's batch."""
        if self.return_entropy:
            return ops.region_features_and_entropy(
                embeddings, assignments, normalize=self.normalize, assignment=self.assignment
            )
        return ops.region_features(embeddings, assignments, normalize=self.normalize, assignment=self.assignment), None

    def discrimination(self, feats: torch.Tensor) -> torch.Tensor:
        """L_rd of (N, K, D) unit region features."""
        return ops.region_discrimination(feats, self.temperature)

    def forward(self, embeddings: torch.Tensor, assignments: torch.Tensor):
        g = self.gather_distributed
        r, ent = self.features(embeddings, assignments)
        if not self.return_entropy:
            return self.discrimination(_gather(r, g))
        if g and _dist.is_distributed():  # same shapes everywhere: the global mean is the mean of means
            ent = _gather(ent.reshape(1), True).mean()
        return self.discrimination(_gather(r, g)), ent


class PatchDiscriminationLoss(nn.Module):
    """Instance (patch) discrimination criterion of LD's PD and mixup terms (section 5).

    ``forward(x)`` takes (M, D) unit rows with M even; rows i and (i + M/2) mod M are a positive
    pair. ``forward(out0, out1)`` takes the two views as (M/2, D) each (row i of ``out0`` pairs
    with row i of ``out1``), the same as ``forward(torch.cat([out0, out1]))``. Temperature 0.1 by
    default, negM = 1, stop-gradients as published, computed stably.

    ``gather_distributed=True``: under torch.distributed the rows of every process are
    all-gathered with gradients (view 1 of all processes, then view 2 of all processes), so every
    row's negatives are the rows of the global batch.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        self.gather_distributed = gather_distributed

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"

    def criterion(self, x: torch.Tensor) -> torch.Tensor:
        """The criterion on (M, D) rows, M even, rows i and (i + M/2) mod M paired."""
        return ops.patch_discrimination(x, self.temperature)

    def forward(self, x: torch.Tensor, out1: torch.Tensor | None = None) -> torch.Tensor:
        gather = self.gather_distributed and _dist.is_distributed()
        if out1 is None:
            if not gather or not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] % 2:
                return self.criterion(x)  # checks x, names it in errors
            h = x.shape[0] // 2
            out0, out1 = x[:h], x[h:]
        else:
            out0 = x
            for name, t in (("out0", out0), ("out1", out1)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
                if t.dim() != 2:
                    raise ValueError(f"{name} must have shape (B, D), got shape {tuple(t.shape)}")
            if out0.shape != out1.shape:
                raise ValueError(
                    f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and {tuple(out1.shape)}"
                )
        return self.criterion(torch.cat([_gather(out0, gather), _gather(out1, gather)]))
