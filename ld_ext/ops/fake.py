"""Fake (meta) kernels of every operator, for torch.compile, meta tensors and FakeTensor.

Each runs its operator's argument checks (csrc/checks.h, through ld_ext._C) first, so a raw call
with meta tensors, or with one meta and one real tensor, is refused as on a real device. Registered
when this module is imported (once, by ld_ext/ops/__init__.py).
"""

from __future__ import annotations

import torch

from .checks import out_dtype
from .compiled import _C


def _contiguous_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("ld_ext::region_features")
def _region_features_fake(embeddings, assignments, normalize, mode, entropy):
    _C.check_region_features(embeddings, assignments, normalize, mode, entropy)
    n, d, k = embeddings.shape[0], embeddings.shape[1], assignments.shape[1]
    dt = out_dtype(embeddings.dtype)
    return (
        embeddings.new_empty((n, k, d), dtype=dt),
        embeddings.new_empty((n, k), dtype=dt),
        embeddings.new_empty((), dtype=dt),
    )


@torch.library.register_fake("ld_ext::region_features_backward")
def _region_features_backward_fake(
    grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, normalize, mode, entropy
):
    _C.check_region_features_backward(
        grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, normalize, mode, entropy
    )
    return _contiguous_like(embeddings), _contiguous_like(assignments)


@torch.library.register_fake("ld_ext::region_discrimination")
def _region_discrimination_fake(feats, temperature):
    _C.check_region_discrimination(feats, temperature)
    return feats.new_empty((), dtype=out_dtype(feats.dtype))


@torch.library.register_fake("ld_ext::region_discrimination_backward")
def _region_discrimination_backward_fake(grad, feats, temperature):
    _C.check_region_discrimination_backward(grad, feats, temperature)
    return _contiguous_like(feats)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity")
def _pixel_cluster_similarity_fake(embeddings, prototypes, temperature, normalize):
    _C.check_pixel_cluster_similarity(embeddings, prototypes, temperature, normalize)
    k = prototypes.shape[-2]
    shape = (embeddings.shape[0], k, *embeddings.shape[2:])
    return embeddings.new_empty(shape)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity_backward")
def _pixel_cluster_similarity_backward_fake(grad_out, embeddings, prototypes, out, temperature, normalize):
    _C.check_pixel_cluster_similarity_backward(grad_out, embeddings, prototypes, out, temperature, normalize)
    return _contiguous_like(embeddings), _contiguous_like(prototypes)


@torch.library.register_fake("ld_ext::patch_discrimination")
def _patch_discrimination_fake(x, temperature):
    _C.check_patch_discrimination(x, temperature)
    return x.new_empty((), dtype=out_dtype(x.dtype))


@torch.library.register_fake("ld_ext::patch_discrimination_backward")
def _patch_discrimination_backward_fake(grad, x, temperature):
    _C.check_patch_discrimination_backward(grad, x, temperature)
    return _contiguous_like(x)
