"""The drop-in loss modules in plain PyTorch: ``LDObjective(loss_impl="reference")``
(``ld-ext pretrain --loss-impl reference``) trains with them, and the benchmarks use them as the
plain-PyTorch baseline of the training step (``ld_ext.bench.baselines`` re-exports them).

``PlainRegionDiscriminationLoss`` and ``PlainPatchDiscriminationLoss`` take the arguments of
``ld_ext.RegionDiscriminationLoss`` / ``ld_ext.PatchDiscriminationLoss`` and gather over
processes the same way (they inherit ``forward``); only the math is replaced by the efficient
eager formulation below (batched matmul, stable criterion). Low-precision inputs are computed in
float32, as the fused ops do.

The functions are the formulation of the test oracle (``ld_ext.reference``, same operations in
the same order, so the same values bit for bit; ``tests/test_bench.py`` checks it). They are
written here, on ``ld_ext.normalization``, because the losses layer never imports the oracle
(docs/architecture.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from .normalization import ENTROPY_EPS, PD_EPS, compute_dtype, normalize_assignments, normalize_embeddings, unit

__all__ = [
    "PlainRegionDiscriminationLoss",
    "PlainPatchDiscriminationLoss",
    "region_features",
    "assignment_entropy",
    "region_discrimination",
    "patch_discrimination",
]


def region_features(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> torch.Tensor:
    """(N, K, D) unit region features, as a batched matmul."""
    e = normalize_embeddings(embeddings) if normalize else embeddings
    a = normalize_assignments(assignments, assignment)
    e, a = e.reshape(e.shape[0], e.shape[1], -1), a.reshape(a.shape[0], a.shape[1], -1)
    r = torch.bmm(a, e.transpose(1, 2)) / e.shape[-1]
    return unit(r, dim=-1)


def assignment_entropy(assignments: torch.Tensor, assignment: str = "probs") -> torch.Tensor:
    """Mean binary entropy (log2) of the normalised assignment, docs/method.md section 4."""
    a = normalize_assignments(assignments, assignment)
    h = -a * torch.log2(a + ENTROPY_EPS) - (1 - a) * torch.log2(1 - a + ENTROPY_EPS)
    return h.mean()


def region_discrimination(feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd on (N, K, D) region features; the cluster centres are NOT detached."""
    n, k, _ = feats.shape
    centres = unit(feats.mean(dim=0), dim=-1)  # (K, D)
    logits = torch.einsum("nkd,jd->nkj", feats, centres) / temperature
    target = torch.arange(k, device=feats.device).repeat(n)
    return F.cross_entropy(logits.reshape(n * k, k), target)


def patch_discrimination(x: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Invariant-and-spreading criterion on (M, D) rows, computed stably.

    Rows i and (i + M/2) mod M are a positive pair; gradients flow only through the first
    argument of every inner product (stop-gradient on the other side, as published). Exponentials
    are taken after subtracting the row maximum (the 1e-10 is scaled with them); log(1 - p_ij) is
    log(W_i - q_ij) - log(W_i) with W_i - q_ij accumulated without the row's largest term where j
    is that term; the positive's own log(1 - p) is left out of the negative sum.
    """
    m = x.shape[0]
    half = m // 2
    rows = torch.arange(m, device=x.device)
    sims = x @ x.detach().t() / temperature  # (M, M)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    sims = sims.masked_fill(eye, float("-inf"))
    row_max, argmax = sims.detach().max(dim=1, keepdim=True)
    q = torch.exp(sims - row_max)  # q_ii = 0, q at the arg-max = 1
    is_max = torch.zeros_like(eye).scatter_(1, argmax, True)
    eps = PD_EPS * torch.exp(-row_max)
    rest = q.masked_fill(is_max, 0.0).sum(dim=1, keepdim=True) + eps  # W - q_max, no cancellation
    w = rest + q.gather(1, argmax)
    others = torch.where(is_max, rest.expand_as(q), w - q)  # W - q_ij
    pos_idx = (rows + half) % m
    log_w = torch.log(w).squeeze(1)
    log_pos = (sims - row_max).gather(1, pos_idx[:, None]).squeeze(1) - log_w
    neg_mask = ~eye
    neg_mask[rows, pos_idx] = False
    log_neg = (torch.log(others.masked_fill(~neg_mask, 1.0)) - log_w[:, None]).masked_fill(~neg_mask, 0.0).sum(dim=1)
    return -(log_pos + log_neg).sum() / m


class PlainRegionDiscriminationLoss(RegionDiscriminationLoss):
    """``RegionDiscriminationLoss`` in plain PyTorch (``region_features`` etc. of this module)."""

    def features(self, embeddings: torch.Tensor, assignments: torch.Tensor):
        e, s = compute_dtype(embeddings), compute_dtype(assignments)
        r = region_features(e, s, normalize=self.normalize, assignment=self.assignment)
        return r, (assignment_entropy(s, self.assignment) if self.return_entropy else None)

    def discrimination(self, feats: torch.Tensor) -> torch.Tensor:
        return region_discrimination(feats, self.temperature)


class PlainPatchDiscriminationLoss(PatchDiscriminationLoss):
    """``PatchDiscriminationLoss`` in plain PyTorch (``patch_discrimination`` of this module)."""

    def criterion(self, x: torch.Tensor) -> torch.Tensor:
        return patch_discrimination(compute_dtype(x), self.temperature)
