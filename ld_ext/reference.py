"""The LD math in plain PyTorch: the oracle for tests and the "pure-PyTorch" side of benchmarks.

Every function exists in the shapes the fused ops accept: embeddings (N, D, *spatial) and
assignments (N, K, *spatial) with 1, 2 or 3 spatial dims (P = their product).

Two formulations of region features are given:

* ``*_broadcast``: the way the published LD code writes it, ``(e[:, None] * a[:, :, None])``
  averaged over pixels. It materialises an (N, K, D, P) tensor.
* ``*_bmm`` (the default names): the same quantity as a batched matrix product, the
  efficient eager formulation.

Constants and the normalisations follow docs/method.md exactly; they are defined once in
``ld_ext.normalization`` (shared with the pipeline) and re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .normalization import (  # noqa: F401  (the constants are part of this module's face)
    ASSIGN_EPS,
    ASSIGNMENT_MODES,
    ENTROPY_EPS,
    NORM_EPS,
    PD_EPS,
    normalize_assignments,
    normalize_embeddings,
    unit,
    unit_and_norm,
)

__all__ = [
    "normalize_embeddings",
    "normalize_assignments",
    "region_features",
    "region_features_bmm",
    "region_features_broadcast",
    "assignment_entropy",
    "region_discrimination",
    "region_discrimination_loss",
    "region_discrimination_loss_broadcast",
    "pixel_cluster_similarity",
    "pixel_cluster_similarity_grad_condition",
    "patch_discrimination",
    "patch_discrimination_published",
]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return unit(x, dim=-1)


def region_features_bmm(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> torch.Tensor:
    """(N, K, D) unit region features, as a batched matmul (efficient eager formulation)."""
    e = normalize_embeddings(embeddings) if normalize else embeddings
    a = normalize_assignments(assignments, assignment)
    e, a = _flat(e), _flat(a)
    r = torch.bmm(a, e.transpose(1, 2)) / e.shape[-1]
    return _unit_rows(r)


region_features = region_features_bmm


def region_features_broadcast(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> torch.Tensor:
    """The published formulation: (e[:, None] * a[:, :, None]) averaged over pixels (N*K*D*P floats)."""
    e = normalize_embeddings(embeddings) if normalize else embeddings
    a = normalize_assignments(assignments, assignment)
    e, a = _flat(e), _flat(a)
    r = (e[:, None, :, :] * a[:, :, None, :]).mean(dim=-1)
    return _unit_rows(r)


def assignment_entropy(assignments: torch.Tensor, assignment: str = "probs") -> torch.Tensor:
    """Mean binary entropy (log2) of the normalised assignment, docs/method.md section 4."""
    a = normalize_assignments(assignments, assignment)
    h = -a * torch.log2(a + ENTROPY_EPS) - (1 - a) * torch.log2(1 - a + ENTROPY_EPS)
    return h.mean()


def region_discrimination(feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd on (N, K, D) region features; the cluster centres are NOT detached."""
    n, k, _ = feats.shape
    centres = _unit_rows(feats.mean(dim=0))  # (K, D)
    logits = torch.einsum("nkd,jd->nkj", feats, centres) / temperature
    target = torch.arange(k, device=feats.device).repeat(n)
    return F.cross_entropy(logits.reshape(n * k, k), target)


def region_discrimination_loss(
    embeddings: torch.Tensor,
    assignments: torch.Tensor,
    *,
    temperature: float = 0.2,
    normalize: bool = False,
    assignment: str = "probs",
    return_entropy: bool = False,
):
    """The efficient eager formulation of RegionDiscriminationLoss (batched matmul)."""
    r = region_features_bmm(embeddings, assignments, normalize=normalize, assignment=assignment)
    loss = region_discrimination(r, temperature)
    if return_entropy:
        return loss, assignment_entropy(assignments, assignment)
    return loss


def region_discrimination_loss_broadcast(
    embeddings: torch.Tensor,
    assignments: torch.Tensor,
    *,
    temperature: float = 0.2,
    normalize: bool = False,
    assignment: str = "probs",
    return_entropy: bool = False,
):
    """The published formulation of the same losses (broadcast product, exp then normalise)."""
    r = region_features_broadcast(embeddings, assignments, normalize=normalize, assignment=assignment)
    n, k, _ = r.shape
    c = unit(r.mean(dim=0), dim=1)
    logits = torch.exp(torch.einsum("nkd,jd->nkj", r, c) / temperature)
    prob = logits / logits.sum(dim=2, keepdim=True)
    diag = torch.diagonal(prob, dim1=1, dim2=2)
    loss = -torch.log(diag).mean()
    if return_entropy:
        return loss, assignment_entropy(assignments, assignment)
    return loss


def pixel_cluster_similarity(
    embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.2, *, normalize: bool = False
) -> torch.Tensor:
    """softmax over K of <prototype_k, e_p> / tau; prototypes (K, D) shared or (N, K, D)."""
    e = normalize_embeddings(embeddings) if normalize else embeddings
    ef = _flat(e)
    if prototypes.dim() == 2:
        logits = torch.einsum("kd,ndp->nkp", prototypes, ef)
    else:
        logits = torch.bmm(prototypes, ef)
    out = torch.softmax(logits / temperature, dim=1)
    return out.reshape(e.shape[0], prototypes.shape[-2], *e.shape[2:])


def pixel_cluster_similarity_grad_condition(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float = 0.2,
    *,
    normalize: bool = False,
) -> tuple[float, float]:
    """Condition numbers (embeddings, prototypes) of the similarity's backward for ``grad_out``:
    a relative rounding error of about eps in each term can become ``eps * cond`` in the gradient.

    g_l = S (g - <g, S>) / tau cancels where one S_k is near 1, and g_e = P^T g_l cancels for
    near-equal prototypes, so tiny or degenerate inputs have large condition numbers; any
    floating-point implementation (this one in float64 included) loses that much there. Computed
    in float64 as ||bound|| / ||gradient|| with bound = S (|g| + <|g|, S>) / tau carried through |P|
    (and, with ``normalize``, the projection). Used by the tests to size tolerances.
    """
    z = embeddings.detach().double().cpu()
    p = prototypes.detach().double().cpu()
    n, d = z.shape[:2]
    zf = z.reshape(n, d, -1)
    g = grad_out.detach().double().cpu().reshape(n, p.shape[-2], -1)
    x, m = unit_and_norm(zf, dim=1) if normalize else (zf, None)
    pk = p if p.dim() == 3 else p.expand(n, -1, -1)
    s = torch.softmax(torch.bmm(pk, x) / temperature, dim=1)
    gl = s * (g - (g * s).sum(1, keepdim=True)) / temperature
    gl_abs = s * (g.abs() + (g.abs() * s).sum(1, keepdim=True)) / temperature
    ge, ge_abs = torch.bmm(pk.transpose(1, 2), gl), torch.bmm(pk.abs().transpose(1, 2), gl_abs)
    gp, gp_abs = torch.bmm(gl, x.transpose(1, 2)), torch.bmm(gl_abs, x.abs().transpose(1, 2))
    if normalize:
        den = m + NORM_EPS
        ge = (ge - x * (x * ge).sum(1, keepdim=True)) / den
        ge_abs = (ge_abs + x.abs() * (x.abs() * ge_abs).sum(1, keepdim=True)) / den
    if p.dim() == 2:
        gp, gp_abs = gp.sum(0), gp_abs.sum(0)

    def ratio(bound: torch.Tensor, grad: torch.Tensor) -> float:
        return bound.norm().item() / max(grad.norm().item(), 1e-300)

    return ratio(ge_abs, ge), ratio(gp_abs, gp)


def patch_discrimination(x: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Invariant-and-spreading criterion on (M, D) rows, computed stably.

    Rows i and (i + M/2) mod M are a positive pair; gradients flow only through the first
    argument of every inner product (stop-gradient on the other side, as published). Stability:
    exponentials are taken after subtracting the shift max(row maximum, log 1e-10) (the 1e-10 is
    scaled with them, so it stays <= 1 where every logit is far below log 1e-10, e.g. anti-aligned
    rows at a small temperature, instead of overflowing to an infinite loss);
    log(1 - p_ij) is computed as log(W_i - q_ij) - log(W_i) with W_i - q_ij the sum of the other
    terms, accumulated without the row's largest term where j is that term; and the positive's own
    log(1 - p) is left out of the negative sum instead of being added and subtracted. The value is
    the published one wherever the published form is finite.
    """
    m = x.shape[0]
    half = m // 2
    rows = torch.arange(m, device=x.device)
    sims = x @ x.detach().t() / temperature  # (M, M)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    sims = sims.masked_fill(eye, float("-inf"))
    row_max, argmax = sims.detach().max(dim=1, keepdim=True)
    shift = row_max.clamp(min=math.log(PD_EPS))
    q = torch.exp(sims - shift)  # q_ii = 0, q at the arg-max = 1 (unless shifted further)
    is_max = torch.zeros_like(eye).scatter_(1, argmax, True)
    eps = PD_EPS * torch.exp(-shift)  # <= 1
    rest = q.masked_fill(is_max, 0.0).sum(dim=1, keepdim=True) + eps  # W - q_max, no cancellation
    w = rest + q.gather(1, argmax)
    others = torch.where(is_max, rest.expand_as(q), w - q)  # W - q_ij
    pos_idx = (rows + half) % m
    log_w = torch.log(w).squeeze(1)
    log_pos = (sims - shift).gather(1, pos_idx[:, None]).squeeze(1) - log_w
    neg_mask = ~eye
    neg_mask[rows, pos_idx] = False
    log_neg = (torch.log(others.masked_fill(~neg_mask, 1.0)) - log_w[:, None]).masked_fill(~neg_mask, 0.0).sum(dim=1)
    return -(log_pos + log_neg).sum() / m


def patch_discrimination_published(x: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The published BatchCriterion (exp then normalise, negM = 1), with the spec's 1e-10."""
    m = x.shape[0]
    half = m // 2
    reordered = torch.cat((x[half:], x[:half]), 0)
    pos = torch.exp((x * reordered.detach()).sum(1) / temperature)
    diag_mat = 1 - torch.eye(m, dtype=x.dtype, device=x.device)
    all_prob = torch.exp(x @ x.detach().t() / temperature) * diag_mat
    all_div = all_prob.sum(1) + PD_EPS
    lnPmt = pos / all_div
    lnPon = all_prob / all_div[:, None]
    lnPon = torch.log(1 - lnPon).sum(1) - torch.log(1 - lnPmt)
    return -(torch.log(lnPmt).sum(0) + lnPon.sum(0)) / m
