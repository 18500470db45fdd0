"""Python face of the fused ops: input checks, autograd and fake-tensor registrations.

The operators themselves are declared in ``csrc/ops.cpp`` (``torch.ops.ld_ext.*``) and
implemented per device in ``csrc/cpu`` and ``csrc/cuda``. Every public function here checks its
inputs (raising ``TypeError``/``ValueError`` that name the argument) and then calls exactly one
operator, so ``torch.compile(fullgraph=True)`` sees a single node per op. The operators check
their arguments again themselves (``csrc/checks.h``, also run by the fake kernels below), since
``torch.ops.ld_ext.*`` can be called directly.
"""
from __future__ import annotations

import math
import numbers

import torch

try:
    from . import _C  # noqa: F401  (loads the library and registers torch.ops.ld_ext)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ld_ext's compiled kernels (ld_ext._C) could not be loaded. Build them with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` for a "
        f"development checkout). Original error: {exc}"
    ) from exc

__all__ = [
    "region_features",
    "region_features_and_entropy",
    "region_discrimination",
    "pixel_cluster_similarity",
    "patch_discrimination",
    "ASSIGNMENT_MODES",
    "build_info",
]

ASSIGNMENT_MODES = {"probs": 0, "sigmoid": 1, "softmax": 2}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_ops = torch.ops.ld_ext


def build_info() -> dict:
    """Facts about the compiled extension: CUDA compiled?, CPU ISA dispatched to, torch built with."""
    return {
        "cuda_compiled": bool(_C.cuda_compiled),
        "cpu_isa": _C.cpu_isa,
        "torch_version_built": _C.torch_version_built,
        "torch_version_running": torch.__version__,
    }


# ----------------------------------------------------------------------------- input checks


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {x.dtype}"
        )


def _check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        # Under autocast mixed floating dtypes are fine: the Autocast kernels (csrc/autocast.cpp)
        # bring both to a common compute dtype in one place.
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


# Smallest temperature the ops accept: 1/temperature must be finite in float32 (csrc/checks.h).
MIN_TEMPERATURE: float = float(_C.min_temperature)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.6g} (1/temperature must be finite in float32), got {temperature!r}"
        )
    return t


def _check_pixel_tensor(name: str, x: torch.Tensor, channels: str) -> None:
    _check_float_tensor(name, x)
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"{name} must have shape (N, {channels}, *spatial) with 1, 2 or 3 spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    _check_nonempty(name, x)


def _check_pair(embeddings: torch.Tensor, assignments: torch.Tensor) -> None:
    _check_pixel_tensor("embeddings", embeddings, "D")
    _check_pixel_tensor("assignments", assignments, "K")
    _check_same("embeddings", embeddings, "assignments", assignments)
    if assignments.dim() != embeddings.dim():
        raise ValueError(
            "embeddings and assignments must have the same number of dims, got shapes "
            f"{tuple(embeddings.shape)} and {tuple(assignments.shape)}"
        )
    if assignments.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings and assignments must have the same batch size N, got {embeddings.shape[0]} "
            f"and {assignments.shape[0]}"
        )
    if assignments.shape[2:] != embeddings.shape[2:]:
        raise ValueError(
            "embeddings and assignments must have the same spatial size, got "
            f"{tuple(embeddings.shape[2:])} and {tuple(assignments.shape[2:])}"
        )


def _mode(assignment) -> int:
    if not isinstance(assignment, str) or assignment not in ASSIGNMENT_MODES:
        raise ValueError(f"assignment must be one of {tuple(ASSIGNMENT_MODES)}, got {assignment!r}")
    return ASSIGNMENT_MODES[assignment]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# ----------------------------------------------------------------------------- public API


def region_features(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> torch.Tensor:
    """Unit region features r (N, K, D), LD_METHOD.md section 3, in one pass over the pixels.

    Args:
        embeddings: (N, D, *spatial) pixel embeddings (1-3 spatial dims).
        assignments: (N, K, *spatial) cluster assignments.
        normalize: L2-normalise each pixel's embedding (z / (||z|| + 1e-10)) inside the kernel.
        assignment: "probs" (use as given), "sigmoid" (logits -> sigmoid -> L1 with eps 1e-9) or
            "softmax" (softmax over K).
    """
    _check_pair(embeddings, assignments)
    feats, _, _ = _ops.region_features(embeddings, assignments, bool(normalize), _mode(assignment), False)
    return feats


def region_features_and_entropy(
    embeddings: torch.Tensor, assignments: torch.Tensor, *, normalize: bool = False, assignment: str = "probs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``region_features`` plus the mean binary entropy of the assignment (section 4), same pass."""
    _check_pair(embeddings, assignments)
    feats, _, ent = _ops.region_features(embeddings, assignments, bool(normalize), _mode(assignment), True)
    return feats, ent


def region_discrimination(region_feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd of (N, K, D) region features against their (not detached) cluster centres."""
    _check_float_tensor("region_feats", region_feats)
    if region_feats.dim() != 3:
        raise ValueError(f"region_feats must have shape (N, K, D), got shape {tuple(region_feats.shape)}")
    _check_nonempty("region_feats", region_feats)
    return _ops.region_discrimination(region_feats, _check_temperature(temperature))


def pixel_cluster_similarity(
    embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.2, *, normalize: bool = False
) -> torch.Tensor:
    """Soft segmentation S (N, K, *spatial) = softmax_k(<prototype_k, e_p> / tau), section 7.

    ``prototypes`` is (K, D), shared by all images, or (N, K, D), one set per image (e.g. the
    image's own region features).
    """
    _check_pixel_tensor("embeddings", embeddings, "D")
    _check_float_tensor("prototypes", prototypes)
    _check_same("embeddings", embeddings, "prototypes", prototypes)
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
    _check_nonempty("prototypes", prototypes)
    return _ops.pixel_cluster_similarity(embeddings, prototypes, _check_temperature(temperature), bool(normalize))


def patch_discrimination(x: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Instance-discrimination criterion on (M, D) unit rows, M even, section 5."""
    _check_float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (M, D), got shape {tuple(x.shape)}")
    _check_nonempty("x", x)
    if x.shape[0] % 2 != 0 or x.shape[0] < 2:
        raise ValueError(f"x must have an even number of rows M >= 2 (row i pairs with i + M/2), got M={x.shape[0]}")
    return _ops.patch_discrimination(x, _check_temperature(temperature))


# ----------------------------------------------------------------------------- fake kernels
# Each runs its operator's argument checks (csrc/checks.h, through ld_ext._C) first, so a raw call
# with meta tensors, or with one meta and one real tensor, is refused as on a real device.


@torch.library.register_fake("ld_ext::region_features")
def _region_features_fake(embeddings, assignments, normalize, mode, entropy):
    _C.check_region_features(embeddings, assignments, normalize, mode, entropy)
    n, d, k = embeddings.shape[0], embeddings.shape[1], assignments.shape[1]
    dt = _out_dtype(embeddings.dtype)
    return (
        embeddings.new_empty((n, k, d), dtype=dt),
        embeddings.new_empty((n, k), dtype=dt),
        embeddings.new_empty((), dtype=dt),
    )


@torch.library.register_fake("ld_ext::region_features_backward")
def _region_features_backward_fake(grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, normalize, mode, entropy):
    _C.check_region_features_backward(
        grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, normalize, mode, entropy
    )
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format), torch.empty_like(
        assignments, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("ld_ext::region_discrimination")
def _region_discrimination_fake(feats, temperature):
    _C.check_region_discrimination(feats, temperature)
    return feats.new_empty((), dtype=_out_dtype(feats.dtype))


@torch.library.register_fake("ld_ext::region_discrimination_backward")
def _region_discrimination_backward_fake(grad, feats, temperature):
    _C.check_region_discrimination_backward(grad, feats, temperature)
    return torch.empty_like(feats, memory_format=torch.contiguous_format)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity")
def _pixel_cluster_similarity_fake(embeddings, prototypes, temperature, normalize):
    _C.check_pixel_cluster_similarity(embeddings, prototypes, temperature, normalize)
    k = prototypes.shape[-2]
    shape = (embeddings.shape[0], k, *embeddings.shape[2:])
    return embeddings.new_empty(shape)


@torch.library.register_fake("ld_ext::pixel_cluster_similarity_backward")
def _pixel_cluster_similarity_backward_fake(grad_out, embeddings, prototypes, out, temperature, normalize):
    _C.check_pixel_cluster_similarity_backward(grad_out, embeddings, prototypes, out, temperature, normalize)
    return torch.empty_like(embeddings, memory_format=torch.contiguous_format), torch.empty_like(
        prototypes, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("ld_ext::patch_discrimination")
def _patch_discrimination_fake(x, temperature):
    _C.check_patch_discrimination(x, temperature)
    return x.new_empty((), dtype=_out_dtype(x.dtype))


@torch.library.register_fake("ld_ext::patch_discrimination_backward")
def _patch_discrimination_backward_fake(grad, x, temperature):
    _C.check_patch_discrimination_backward(grad, x, temperature)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- autograd


def _rf_setup_context(ctx, inputs, output):
    embeddings, assignments, normalize, mode, entropy = inputs
    feats, rnorm, _ = output
    ctx.save_for_backward(embeddings, assignments, feats, rnorm)
    ctx.cfg = (normalize, mode, entropy)
    ctx.mark_non_differentiable(rnorm)


def _rf_backward(ctx, grad_feats, grad_rnorm, grad_entropy):
    embeddings, assignments, feats, rnorm = ctx.saved_tensors
    if grad_feats is None:
        grad_feats = torch.zeros_like(feats)
    if grad_entropy is None:
        grad_entropy = feats.new_zeros(())
    ge, ga = _ops.region_features_backward(grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, *ctx.cfg)
    return ge, ga, None, None, None


torch.library.register_autograd("ld_ext::region_features", _rf_backward, setup_context=_rf_setup_context)


def _rd_setup_context(ctx, inputs, output):
    feats, temperature = inputs
    ctx.save_for_backward(feats)
    ctx.temperature = temperature


def _rd_backward(ctx, grad):
    (feats,) = ctx.saved_tensors
    return _ops.region_discrimination_backward(grad, feats, ctx.temperature), None


torch.library.register_autograd("ld_ext::region_discrimination", _rd_backward, setup_context=_rd_setup_context)


def _pcs_setup_context(ctx, inputs, output):
    embeddings, prototypes, temperature, normalize = inputs
    ctx.save_for_backward(embeddings, prototypes, output)
    ctx.cfg = (temperature, normalize)


def _pcs_backward(ctx, grad_out):
    embeddings, prototypes, out = ctx.saved_tensors
    ge, gp = _ops.pixel_cluster_similarity_backward(grad_out, embeddings, prototypes, out, *ctx.cfg)
    return ge, gp, None, None


torch.library.register_autograd("ld_ext::pixel_cluster_similarity", _pcs_backward, setup_context=_pcs_setup_context)


def _pd_setup_context(ctx, inputs, output):
    x, temperature = inputs
    ctx.save_for_backward(x)
    ctx.temperature = temperature


def _pd_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _ops.patch_discrimination_backward(grad, x, ctx.temperature), None


torch.library.register_autograd("ld_ext::patch_discrimination", _pd_backward, setup_context=_pd_setup_context)


# Double backward is refused explicitly (torchvision does the same): the backward ops are not
# differentiated, and without this an attempt would silently give wrong second derivatives.
def _refuse_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"ld_ext: double backward through {op_name} is not supported (a gradient taken with "
            "create_graph=True was differentiated again); use ld_ext.reference for higher-order gradients"
        )

    return backward


for _name in (
    "region_features_backward",
    "region_discrimination_backward",
    "pixel_cluster_similarity_backward",
    "patch_discrimination_backward",
):
    torch.library.register_autograd(
        f"ld_ext::{_name}", _refuse_double_backward(_name), setup_context=lambda ctx, inputs, output: None
    )
