"""The method's constants and normalisations (docs/method.md sections 2, 4 and 5), defined once.

Both the test oracle (``ld_ext.reference``) and the pipeline (``ld_ext.objective``) import them
from here, so that neither has to import the other; the kernels use the same values
(``csrc/ld_ext.h``).
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-10  # e = z / (||z|| + 1e-10); r = r~ / (||r~|| + 1e-10); c likewise
ASSIGN_EPS = 1e-9  # a = (s + 1e-9) / sum_k (s + 1e-9)
ENTROPY_EPS = 1e-30  # -a log2(a + 1e-30) - (1 - a) log2(1 - a + 1e-30)
PD_EPS = 1e-10  # P_i = pos_i / (Z_i + 1e-10)

# The assignment modes by name, with the number the operators take for each (`mode` in
# csrc/ops.cpp's schemas; csrc/ld_ext.h). The one definition: ld_ext.ops and ld_ext.reference use it.
ASSIGNMENT_MODES = {"probs": 0, "sigmoid": 1, "softmax": 2}

__all__ = [
    "NORM_EPS",
    "ASSIGN_EPS",
    "ENTROPY_EPS",
    "PD_EPS",
    "ASSIGNMENT_MODES",
    "compute_dtype",
    "unit",
    "unit_and_norm",
    "normalize_embeddings",
    "normalize_assignments",
    "sigmoid_assignments",
]


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Low-precision tensors (bfloat16, float16) as float32, the precision the fused ops compute
    in; float32 and float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / (||x|| + 1e-10)`` along ``dim``: the L2 normalisation every LD vector gets."""
    return unit_and_norm(x, dim)[0]


def unit_and_norm(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``unit(x, dim)`` and the norm ``||x||`` it divided by (``dim`` kept, size 1), for the
    derivative rules that need the norm too (ld_ext.ops' forward-mode rules)."""
    m = torch.norm(x, p=2, dim=dim, keepdim=True)
    return x / (m + NORM_EPS), m


def normalize_embeddings(z: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 normalisation over the channel dim: z / (||z|| + 1e-10)."""
    return unit(z, dim=1)


def normalize_assignments(s: torch.Tensor, assignment: str = "probs") -> torch.Tensor:
    """The assignment a used by the loss, from the clustering branch output s.

    "probs": s as given; "sigmoid": logits -> sigmoid -> (s + 1e-9) / sum_k (s + 1e-9);
    "softmax": softmax over K.
    """
    if assignment == "probs":
        return s
    if assignment == "sigmoid":
        return sigmoid_assignments(s)[0]
    if assignment == "softmax":
        return torch.softmax(s, dim=1)
    raise ValueError(f"assignment must be one of {tuple(ASSIGNMENT_MODES)}, got {assignment!r}")


def sigmoid_assignments(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The "sigmoid" rule, a = u / sum_k u with u = sigmoid(s) + 1e-9 (dim 1 is K), and the sum
    sum_k u it divided by (kept dim), for the derivative rules that need it too."""
    u = torch.sigmoid(s) + ASSIGN_EPS
    total = u.sum(dim=1, keepdim=True)
    return u / total, total
