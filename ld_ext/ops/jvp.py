"""The forward-mode (jvp) math of the ops' autograd Functions (ld_ext/ops/functions.py): the
normalisations of docs/method.md with their tangents, computed in float32 (float64 for float64
inputs), as the kernels compute. The normalisations themselves are ld_ext.normalization's, the
ones the reference uses; only their derivatives are written here."""

from __future__ import annotations

import math

import torch

from ..normalization import (
    ASSIGNMENT_MODES,
    ENTROPY_EPS,
    NORM_EPS,
    normalize_assignments,
    sigmoid_assignments,
    unit_and_norm,
)

_MODE_NAMES = {code: name for name, code in ASSIGNMENT_MODES.items()}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for inputs of ``dtype``: float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat3(t, n: int, c: int, ct: torch.dtype):
    """(N, C, *spatial) as (N, C, P) in dtype ``ct``; None stays None (no tangent)."""
    return None if t is None else t.reshape(n, c, -1).to(ct)


def normalize_jvp(z: torch.Tensor, z_t):
    """e = z / (||z|| + eps) over dim 1 and its tangent (None if z_t is None); 0 where ||z|| = 0."""
    e, m = unit_and_norm(z, dim=1)
    if z_t is None:
        return e, None
    coef = torch.where(m > 0, (e * z_t).sum(dim=1, keepdim=True) * (1 + NORM_EPS / m), torch.zeros_like(m))
    return e, (z_t - e * coef) / (m + NORM_EPS)


def assignment_jvp(s: torch.Tensor, s_t, mode: int):
    """The normalised assignment a (dim 1 is K) of mode 0/1/2 (ASSIGNMENT_MODES) and its tangent
    (None if s_t is None)."""
    name = _MODE_NAMES[mode]
    if name == "sigmoid":
        a, total = sigmoid_assignments(s)
        if s_t is None:
            return a, None
        sg = torch.sigmoid(s)
        u_t = sg * (1 - sg) * s_t
        return a, (u_t - a * u_t.sum(dim=1, keepdim=True)) / total
    a = normalize_assignments(s, name)
    if name == "probs" or s_t is None:
        return a, s_t
    return a, a * (s_t - (a * s_t).sum(dim=1, keepdim=True))  # softmax


def entropy_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da of the binary entropy (log2) -a log2(a + eps) - (1 - a) log2(1 - a + eps)."""
    eps, b = ENTROPY_EPS, 1 - a
    inv_ln2 = 1.0 / math.log(2.0)
    return -torch.log2(a + eps) - a / (a + eps) * inv_ln2 + torch.log2(b + eps) + b / (b + eps) * inv_ln2
