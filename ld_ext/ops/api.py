"""The public functions of the fused ops: each checks its inputs (ld_ext/ops/checks.py) and then
calls exactly one operator, so ``torch.compile(fullgraph=True)`` sees a single node per op."""

from __future__ import annotations

import torch

from .checks import (
    assignment_mode,
    check_float_tensor,
    check_nonempty,
    check_pair,
    check_pixel_tensor,
    check_same,
    check_temperature,
)
from .compiled import _C, ops

__all__ = [
    "region_features",
    "region_features_and_entropy",
    "region_discrimination",
    "pixel_cluster_similarity",
    "patch_discrimination",
    "build_info",
]


def build_info() -> dict:
    """Facts about the compiled extension: CUDA compiled?, CPU ISA dispatched to, torch built with."""
    return {
        "cuda_compiled": bool(_C.cuda_compiled),
        "cpu_isa": _C.cpu_isa,
        "torch_version_built": _C.torch_version_built,
        "torch_version_running": torch.__version__,
    }


def region_features(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> torch.Tensor:
    """Unit region features r (N, K, D), docs/method.md section 3, in one pass over the pixels.

    Args:
        embeddings: (N, D, *spatial) pixel embeddings (1-3 spatial dims).
        assignments: (N, K, *spatial) cluster assignments.
        normalize: L2-normalise each pixel's embedding (z / (||z|| + 1e-10)) inside the kernel.
        assignment: "probs" (use as given), "sigmoid" (logits -> sigmoid -> L1 with eps 1e-9) or
            "softmax" (softmax over K).
    """
    check_pair(embeddings, assignments)
    feats, _, _ = ops.region_features(embeddings, assignments, bool(normalize), assignment_mode(assignment), False)
    return feats


def region_features_and_entropy(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``region_features`` plus the mean binary entropy of the assignment (section 4), same pass."""
    check_pair(embeddings, assignments)
    feats, _, ent = ops.region_features(embeddings, assignments, bool(normalize), assignment_mode(assignment), True)
    return feats, ent


def region_discrimination(region_feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd of (N, K, D) region features against their (not detached) cluster centres."""
    check_float_tensor("region_feats", region_feats)
    if region_feats.dim() != 3:
        raise ValueError(f"region_feats must have shape (N, K, D), got shape {tuple(region_feats.shape)}")
    check_nonempty("region_feats", region_feats)
    return ops.region_discrimination(region_feats, check_temperature(temperature))


def pixel_cluster_similarity(
    embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.2, *, normalize: bool = False
) -> torch.Tensor:
    """Soft segmentation S (N, K, *spatial) = softmax_k(<prototype_k, e_p> / tau), section 7.

    ``prototypes`` is (K, D), shared by all images, or (N, K, D), one set per image (e.g. the
    image's own region features).
    """
    check_pixel_tensor("embeddings", embeddings, "D")
    check_float_tensor("prototypes", prototypes)
    check_same("embeddings", embeddings, "prototypes", prototypes)
    d = embeddings.shape[1]
    if prototypes.dim() == 2:
        if prototypes.shape[1] != d:
            raise ValueError(
                f"prototypes must have shape (K, D) with D={d} matching embeddings, got {tuple(prototypes.shape)}"
            )
    elif prototypes.dim() == 3:
        if prototypes.shape[0] != embeddings.shape[0] or prototypes.shape[2] != d:
            raise ValueError(
                f"prototypes must have shape (N, K, D) with N={embeddings.shape[0]} and D={d} matching "
                f"embeddings, got {tuple(prototypes.shape)}"
            )
    else:
        raise ValueError(f"prototypes must have shape (K, D) or (N, K, D), got shape {tuple(prototypes.shape)}")
    check_nonempty("prototypes", prototypes)
    return ops.pixel_cluster_similarity(embeddings, prototypes, check_temperature(temperature), bool(normalize))


def patch_discrimination(x: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Instance-discrimination criterion on (M, D) unit rows, M even, section 5."""
    check_float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, D), got shape {tuple(x.shape)}")
    check_nonempty("x", x)
    if x.shape[0] % 2 != 0 or x.shape[0] < 2:
        raise ValueError(f"x must have an even number of rows M >= 2 (row i pairs with i + M/2), got M={x.shape[0]}")
    return ops.patch_discrimination(x, check_temperature(temperature))
