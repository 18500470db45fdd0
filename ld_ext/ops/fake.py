"""Fake (meta) kernels of every operator, for torch.compile, meta tensors and FakeTensor.

Each runs its operator's argument checks (csrc/checks.h, through ld_ext._C) first, so a raw call
with meta tensors, or with one meta and one real tensor, is refused as on a real device. Registered
when this module is imported (once, by ld_ext/ops/__init__.py).

Also the operators' CompositeExplicitAutograd kernel, which the dispatcher runs only where no
device kernel applies: a raw call with no tensor at all (every tensor argument None), which torch
would otherwise refuse with "There were no tensor arguments to this function" naming none of them,
or tensors on a device without kernels. It names the argument or the device.
"""

from __future__ import annotations

import torch

from . import registry
from .checks import out_dtype
from .compiled import _C, ops

_lib = torch.library.Library("ld_ext", "IMPL")


def _refuse_none(name: str, args) -> None:
    """TypeError naming the first tensor argument of operator ``name`` that is None."""
    for arg, value in zip(getattr(ops, name).default._schema.arguments, args):
        if value is None and arg.type.kind() == "TensorType":
            raise TypeError(f"ld_ext::{name}: {arg.name} must be a tensor, got None")


def _check(name: str, *args) -> None:
    """Operator ``name``'s argument checks (csrc/checks.h through ld_ext._C), None refused first (the
    bindings take tensors only, and would raise a TypeError naming no argument)."""
    _refuse_none(name, args)
    for arg, value in zip(getattr(ops, name).default._schema.arguments, args):
        # the kernels' checks::temperature_arg: a Scalar keeps bool and complex, which are refused
        if arg.name == "temperature" and isinstance(value, (bool, complex)):
            kind = "bool" if isinstance(value, bool) else "complex"
            raise TypeError(f"ld_ext::{name}: temperature must be a real number, got {kind}")
    getattr(_C, f"check_{name}")(*args)


def _no_device_kernel(name: str):
    def kernel(*args):
        _refuse_none(name, args)
        devices = sorted({str(v.device) for v in args if isinstance(v, torch.Tensor)})
        raise NotImplementedError(
            f"ld_ext::{name}: no kernel for tensors on {', '.join(devices) or 'no device'} "
            f"(ld_ext has kernels for cpu{' and cuda' if _C.cuda_compiled else ''})"
        )

    return kernel


for _name in registry.OPERATORS:
    _lib.impl(_name, _no_device_kernel(_name), "CompositeExplicitAutograd")


def _contiguous_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("ld_ext::region_features")
def _region_features_fake(embeddings, assignments, normalize, mode, entropy):
    _check("region_features", embeddings, assignments, normalize, mode, entropy)
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
    _check(
        "region_features_backward",
        grad_feats,
        grad_entropy,
        embeddings,
        assignments,
        feats,
        rnorm,
        normalize,
        mode,
        entropy,
    )
    return _contiguous_like(embeddings), _contiguous_like(assignments)


@torch.library.register_fake("ld_ext::region_discrimination")
def _region_discrimination_fake(feats, temperature):
    _check("region_discrimination", feats, temperature)
    return feats.new_empty((), dtype=out_dtype(feats.dtype))


@torch.library.register_fake("ld_ext::region_discrimination_backward")
def _region_discrimination_backward_fake(grad, feats, temperature):
    _check("region_discrimination_backward", grad, feats, temperature)
    return _contiguous_like(feats)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity")
def _pixel_cluster_similarity_fake(embeddings, prototypes, temperature, normalize):
    _check("pixel_cluster_similarity", embeddings, prototypes, temperature, normalize)
    k = prototypes.shape[-2]
    shape = (embeddings.shape[0], k, *embeddings.shape[2:])
    return embeddings.new_empty(shape)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity_backward")
def _pixel_cluster_similarity_backward_fake(grad_out, embeddings, prototypes, out, temperature, normalize):
    _check("pixel_cluster_similarity_backward", grad_out, embeddings, prototypes, out, temperature, normalize)
    return _contiguous_like(embeddings), _contiguous_like(prototypes)


@torch.library.register_fake("ld_ext::patch_discrimination")
def _patch_discrimination_fake(x, temperature):
    _check("patch_discrimination", x, temperature)
    return x.new_empty((), dtype=out_dtype(x.dtype))


@torch.library.register_fake("ld_ext::patch_discrimination_backward")
def _patch_discrimination_backward_fake(grad, x, temperature):
    _check("patch_discrimination_backward", grad, x, temperature)
    return _contiguous_like(x)
