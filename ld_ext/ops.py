"""Python face of the fused ops: input checks, autograd and fake-tensor registrations.

The operators themselves are declared in ``csrc/ops.cpp`` (``torch.ops.ld_ext.*``) and
implemented per device in ``csrc/cpu`` and ``csrc/cuda``. Every public function here checks its
inputs (raising ``TypeError``/``ValueError`` that name the argument) and then calls exactly one
operator, so ``torch.compile(fullgraph=True)`` sees a single node per op. The operators check
their arguments again themselves (``csrc/checks.h``, also run by the fake kernels below), since
``torch.ops.ld_ext.*`` can be called directly.

Autograd: each operator's Autograd kernel is an ``autograd.Function`` with ``setup_context``, a
backward (the fused backward operator) and a forward-mode rule (``jvp``), so ``torch.autograd``,
``torch.autograd.forward_ad`` and ``torch.func`` (grad, vjp, jvp, jacrev, jacfwd) all work.
"""
from __future__ import annotations

import math
import numbers

import torch

from .normalization import ASSIGN_EPS, ENTROPY_EPS, NORM_EPS

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
    if not (0.0 < t < math.inf):  # comparisons only (no math.isfinite): traceable with symbolic floats
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
    """Unit region features r (N, K, D), docs/method.md section 3, in one pass over the pixels.

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
#
# torch.library.register_autograd would be the short way, but the autograd.Function it generates
# has no setup_context, and torch.func refuses such a Function ("must override the setup_context
# staticmethod", pytorch/pytorch#168393); and with no forward-mode rule, a dual input that does not
# require grad took the no-grad path, so forward-mode AD silently gave zero tangents. So each
# operator gets its own Function (forward below autograd, setup_context, backward, jvp) and an
# Autograd kernel that uses it whenever gradients may be needed: grad mode with an input that
# requires grad, a forward-AD level (torch.autograd.forward_ad / torch.func.jvp), or any
# torch.func transform. Inside an operator's kernel, Function.apply cannot hand the call to
# torch.func (its custom_function_call finds no functorch key left to dispatch on), so the Function
# is applied at the current torch.func level, as a C++ autograd kernel would be, with functorch's
# single-level switch (the path of the pytorch/pytorch#184974 fix for register_autograd). That
# serves one differentiating level (grad, vjp, jvp, and vmap around them: jacrev, jacfwd); nested
# differentiation is refused (_check_single_differentiation_level) rather than silently missing
# the ops' second derivatives. The Functions derive from autograd's _SingleLevelFunction, as the
# ones torch.func itself generates do: from torch 2.14 on, Function.apply (in C++) hands every call
# under a transform to custom_function_call, also through super(). Uses private torch APIs
# (torch._functorch, torch.autograd.function._SingleLevelFunction, forward_ad._current_level).

from torch.autograd.function import _SingleLevelFunction  # noqa: E402

_lib = torch.library.Library("ld_ext", "IMPL")
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def _forward_ad_active() -> bool:
    return torch.autograd.forward_ad._current_level >= 0


def _save_for_jvp(ctx, *tensors) -> None:
    # Only under forward AD: saving the outputs on ctx otherwise would keep them alive in a cycle.
    if _forward_ad_active():
        ctx.save_for_forward(*tensors)


def _function_apply(name, function, *args):
    from torch._functorch.autograd_function import enable_single_level_autograd_function

    if torch._C._are_functorch_transforms_active():
        _check_single_differentiation_level(name, args)
    with enable_single_level_autograd_function():
        return function.apply(*args)


def _base_tensor(t):
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t) or f.is_batchedtensor(t):
        t = f.get_unwrapped(t)
    return t


def _check_single_differentiation_level(name, args) -> None:
    """Under torch.func, the ops' autograd nodes live at one level (the innermost transform's):
    more than one differentiating level (grad/vjp/jvp of grad/vjp/jvp, or torch.autograd over a
    torch.func transform) would silently miss the ops' higher derivatives, so it is refused."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    diff = [i for i in retrieve_all_functorch_interpreters() if i.key() in (TransformType.Grad, TransformType.Jvp)]
    outer = diff and any(
        isinstance(a, torch.Tensor) and _base_tensor(a).requires_grad for a in args
    )
    if len(diff) > 1 or outer:
        raise RuntimeError(
            f"ld_ext: {name} under nested differentiation (torch.func grad/vjp/jvp inside another "
            "grad/vjp/jvp, or torch.autograd through a torch.func transform) is not supported: "
            "second derivatives of the fused ops are not implemented; use ld_ext.reference for them, "
            "or detach the inputs if no outer derivative is wanted"
        )


def _unwrap_dead_wrappers(args):
    from torch._functorch.utils import unwrap_dead_wrappers

    return unwrap_dead_wrappers(args)


def _register(name: str, function) -> None:
    op = getattr(_ops, name).default

    def autograd_kernel(keyset, *args):
        if (
            (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
            or _forward_ad_active()
            or torch._C._are_functorch_transforms_active()
        ):
            # The C++ entry of autograd.Function (what Function.apply calls outside torch.func):
            # Function.apply would hand the call to torch.func's custom_function_call, which cannot
            # run from inside an operator's kernel; here, as for any C++ autograd kernel, torch.func
            # has already wrapped the inputs for its level.
            return _function_apply(name, function, *_unwrap_dead_wrappers(args))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize_jvp(z: torch.Tensor, z_t):
    """e = z / (||z|| + eps) over dim 1 and its tangent (None if z_t is None); 0 where ||z|| = 0."""
    m = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    den = m + _NORM_EPS
    e = z / den
    if z_t is None:
        return e, None
    coef = torch.where(m > 0, (e * z_t).sum(dim=1, keepdim=True) * (1 + _NORM_EPS / m), torch.zeros_like(m))
    return e, (z_t - e * coef) / den


def _assignment_jvp(s: torch.Tensor, s_t, mode: int):
    """The normalised assignment a (dim 1 is K) of mode 0/1/2 and its tangent (None if s_t is None)."""
    if mode == 0:
        return s, s_t
    if mode == 1:
        sg = torch.sigmoid(s)
        u = sg + _ASSIGN_EPS
        usum = u.sum(dim=1, keepdim=True)
        a = u / usum
        if s_t is None:
            return a, None
        u_t = sg * (1 - sg) * s_t
        return a, (u_t - a * u_t.sum(dim=1, keepdim=True)) / usum
    a = torch.softmax(s, dim=1)
    if s_t is None:
        return a, None
    return a, a * (s_t - (a * s_t).sum(dim=1, keepdim=True))


def _entropy_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da of the binary entropy (log2) -a log2(a + eps) - (1 - a) log2(1 - a + eps)."""
    eps, b = _ENTROPY_EPS, 1 - a
    inv_ln2 = 1.0 / math.log(2.0)
    return -torch.log2(a + eps) - a / (a + eps) * inv_ln2 + torch.log2(b + eps) + b / (b + eps) * inv_ln2


_NORM_EPS, _ASSIGN_EPS, _ENTROPY_EPS = NORM_EPS, ASSIGN_EPS, ENTROPY_EPS  # as csrc/ld_ext.h


def _flat3(t, n, c, ct):
    return None if t is None else t.reshape(n, c, -1).to(ct)


class _RegionFeatures(_SingleLevelFunction):
    generate_vmap_rule = True

    @staticmethod
    def forward(embeddings, assignments, normalize, mode, entropy):
        return _below_autograd(_ops.region_features.default, embeddings, assignments, normalize, mode, entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        embeddings, assignments, normalize, mode, entropy = inputs
        feats, rnorm, _ = output
        ctx.save_for_backward(embeddings, assignments, feats, rnorm)
        _save_for_jvp(ctx, embeddings, assignments, feats, rnorm)
        ctx.cfg = (normalize, mode, entropy)
        ctx.mark_non_differentiable(rnorm)

    @staticmethod
    def backward(ctx, grad_feats, grad_rnorm, grad_entropy):
        embeddings, assignments, feats, rnorm = ctx.saved_tensors
        if grad_feats is None:
            grad_feats = torch.zeros_like(feats)
        if grad_entropy is None:
            grad_entropy = feats.new_zeros(())
        ge, ga = _ops.region_features_backward(
            grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, *ctx.cfg
        )
        return ge, ga, None, None, None

    @staticmethod
    def jvp(ctx, embeddings_t, assignments_t, *_):
        # r~ = a e^T / P, r = r~ / (||r~|| + eps): r' = r~' / (||r~|| + eps) - r (r . r~') / ||r~||.
        embeddings, assignments, feats, rnorm = ctx.saved_tensors
        normalize, mode, entropy = ctx.cfg
        ct = _compute_dtype(embeddings.dtype)
        n, d, k = embeddings.shape[0], embeddings.shape[1], assignments.shape[1]
        z, s = _flat3(embeddings, n, d, ct), _flat3(assignments, n, k, ct)
        z_t, s_t = _flat3(embeddings_t, n, d, ct), _flat3(assignments_t, n, k, ct)
        e, e_t = _normalize_jvp(z, z_t) if normalize else (z, z_t)
        a, a_t = _assignment_jvp(s, s_t, mode)
        rt = torch.zeros(n, k, d, dtype=ct, device=z.device)
        if a_t is not None:
            rt = rt + torch.bmm(a_t, e.transpose(1, 2))
        if e_t is not None:
            rt = rt + torch.bmm(a, e_t.transpose(1, 2))
        rt = rt / z.shape[-1]
        r, nr = feats.to(ct), rnorm.to(ct).unsqueeze(-1)
        coef = torch.where(nr > 0, (r * rt).sum(dim=-1, keepdim=True) / nr, torch.zeros_like(nr))
        feats_t = (rt / (nr + _NORM_EPS) - r * coef).to(feats.dtype)
        ent_t = torch.zeros((), dtype=feats.dtype, device=feats.device)
        if entropy and a_t is not None:
            ent_t = (_entropy_grad(a) * a_t).mean().to(feats.dtype)
        return feats_t, None, ent_t


class _PixelClusterSimilarity(_SingleLevelFunction):
    generate_vmap_rule = True

    @staticmethod
    def forward(embeddings, prototypes, temperature, normalize):
        return _below_autograd(_ops.pixel_cluster_similarity.default, embeddings, prototypes, temperature, normalize)

    @staticmethod
    def setup_context(ctx, inputs, output):
        embeddings, prototypes, temperature, normalize = inputs
        ctx.save_for_backward(embeddings, prototypes, output)
        _save_for_jvp(ctx, embeddings, prototypes, output)
        ctx.cfg = (temperature, normalize)

    @staticmethod
    def backward(ctx, grad_out):
        embeddings, prototypes, out = ctx.saved_tensors
        ge, gp = _ops.pixel_cluster_similarity_backward(grad_out, embeddings, prototypes, out, *ctx.cfg)
        return ge, gp, None, None

    @staticmethod
    def jvp(ctx, embeddings_t, prototypes_t, *_):
        # l = <p_k, e> / tau, S = softmax_k(l): S' = S (l' - sum_k S l').
        embeddings, prototypes, out = ctx.saved_tensors
        temperature, normalize = ctx.cfg
        ct = _compute_dtype(embeddings.dtype)
        n, d = embeddings.shape[0], embeddings.shape[1]
        z, z_t = _flat3(embeddings, n, d, ct), _flat3(embeddings_t, n, d, ct)
        e, e_t = _normalize_jvp(z, z_t) if normalize else (z, z_t)

        def per_image(p):
            p = p.to(ct)
            return p.expand(n, -1, -1) if p.dim() == 2 else p

        pk = per_image(prototypes)
        if out.dtype == ct:
            s = out.reshape(n, pk.shape[1], -1)
        else:  # float16/bfloat16 output: the softmax again in the compute dtype
            s = torch.softmax(torch.bmm(pk, e) / temperature, dim=1)
        l_t = torch.zeros_like(s)
        if e_t is not None:
            l_t = l_t + torch.bmm(pk, e_t)
        if prototypes_t is not None:
            l_t = l_t + torch.bmm(per_image(prototypes_t), e)
        l_t = l_t / temperature
        return (s * (l_t - (s * l_t).sum(dim=1, keepdim=True))).reshape(out.shape).to(out.dtype)


def _function_class(name: str, forward, setup_context, backward, jvp):
    """A _SingleLevelFunction named ``_NAME`` from its four rules (vmap rule generated)."""
    return type(
        f"_{name}",
        (_SingleLevelFunction,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )


def _scalar_loss_function(name: str):
    """The Function of a scalar loss of (x, temperature) whose gradient is the fused ``NAME_backward``
    op (region_discrimination, patch_discrimination). Its tangent is <d loss / d x, x_t>, with that
    fused gradient; for patch_discrimination the gradient (as published) does not flow through the
    stop-gradient side of the similarities, so the tangent is the derivative along x_t with that side
    held at x, the same as forward-mode AD of ld_ext.reference.patch_discrimination (whose detach()
    does the same)."""
    op, backward_op = getattr(_ops, name).default, getattr(_ops, name + "_backward")

    def forward(x, temperature):
        return _below_autograd(op, x, temperature)

    def setup_context(ctx, inputs, output):
        x, temperature = inputs
        ctx.save_for_backward(x)
        _save_for_jvp(ctx, x)
        ctx.temperature = temperature

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_op(grad, x, ctx.temperature), None

    def jvp(ctx, x_t, _):
        (x,) = ctx.saved_tensors
        ot = _out_dtype(x.dtype)
        g = backward_op(x.new_ones((), dtype=ot), x, ctx.temperature)
        return (g.to(ot) * x_t.to(ot)).sum()

    return _function_class(name, forward, setup_context, backward, jvp)


_RegionDiscrimination = _scalar_loss_function("region_discrimination")
_PatchDiscrimination = _scalar_loss_function("patch_discrimination")


def _refusing_function(name: str):
    """The Function of a backward operator: not differentiable again, in either mode, said clearly."""
    op = getattr(_ops, name).default

    def forward(*args):
        return _below_autograd(op, *args)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        # Double backward is refused explicitly (torchvision does the same): without this an attempt
        # would silently give wrong second derivatives.
        raise RuntimeError(
            f"ld_ext: double backward through {name} is not supported (a gradient taken with "
            "create_graph=True was differentiated again); use ld_ext.reference for higher-order gradients"
        )

    def jvp(ctx, *tangents):
        raise RuntimeError(
            f"ld_ext: forward-mode AD through {name} is not supported (forward-over-reverse, e.g. "
            "torch.func.hessian or jacfwd of a gradient); use ld_ext.reference for higher-order derivatives"
        )

    return _function_class(name, forward, setup_context, backward, jvp)


_register("region_features", _RegionFeatures)
_register("region_discrimination", _RegionDiscrimination)
_register("pixel_cluster_similarity", _PixelClusterSimilarity)
_register("patch_discrimination", _PatchDiscrimination)
for _name in (
    "region_features_backward",
    "region_discrimination_backward",
    "pixel_cluster_similarity_backward",
    "patch_discrimination_backward",
):
    _register(_name, _refusing_function(_name))
