"""The autograd Function of every operator: forward (the operator below autograd), setup_context,
backward (the fused backward operator) and a forward-mode rule (jvp, math in ld_ext/ops/jvp.py).

The backward operators' Functions refuse to be differentiated again. ``FUNCTIONS`` maps every
operator of the registry to its Function; ld_ext/ops/autograd.py installs them as the operators'
Autograd kernels. The Functions derive from autograd's private _SingleLevelFunction (see
autograd.py for why).
"""

from __future__ import annotations

import torch
from torch.autograd.function import _SingleLevelFunction

from ..normalization import NORM_EPS
from . import registry
from .checks import out_dtype
from .compiled import ops
from .jvp import assignment_jvp, compute_dtype, entropy_grad, flat3, normalize_jvp


def forward_ad_active() -> bool:
    """Whether a forward-AD level is open (torch.autograd.forward_ad / torch.func.jvp)."""
    return torch.autograd.forward_ad._current_level >= 0


def _save_for_jvp(ctx, *tensors) -> None:
    # Only under forward AD: saving the outputs on ctx otherwise would keep them alive in a cycle.
    if forward_ad_active():
        ctx.save_for_forward(*tensors)


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _RegionFeatures(_SingleLevelFunction):
    generate_vmap_rule = True

    @staticmethod
    def forward(embeddings, assignments, normalize, mode, entropy):
        return _below_autograd(ops.region_features.default, embeddings, assignments, normalize, mode, entropy)

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
        ge, ga = ops.region_features_backward(grad_feats, grad_entropy, embeddings, assignments, feats, rnorm, *ctx.cfg)
        return ge, ga, None, None, None

    @staticmethod
    def jvp(ctx, embeddings_t, assignments_t, *_):
        # r~ = a e^T / P, r = r~ / (||r~|| + eps): r' = r~' / (||r~|| + eps) - r (r . r~') / ||r~||.
        embeddings, assignments, feats, rnorm = ctx.saved_tensors
        normalize, mode, entropy = ctx.cfg
        ct = compute_dtype(embeddings.dtype)
        n, d, k = embeddings.shape[0], embeddings.shape[1], assignments.shape[1]
        z, s = flat3(embeddings, n, d, ct), flat3(assignments, n, k, ct)
        z_t, s_t = flat3(embeddings_t, n, d, ct), flat3(assignments_t, n, k, ct)
        e, e_t = normalize_jvp(z, z_t) if normalize else (z, z_t)
        a, a_t = assignment_jvp(s, s_t, mode)
        rt = torch.zeros(n, k, d, dtype=ct, device=z.device)
        if a_t is not None:
            rt = rt + torch.bmm(a_t, e.transpose(1, 2))
        if e_t is not None:
            rt = rt + torch.bmm(a, e_t.transpose(1, 2))
        rt = rt / z.shape[-1]
        r, nr = feats.to(ct), rnorm.to(ct).unsqueeze(-1)
        coef = torch.where(nr > 0, (r * rt).sum(dim=-1, keepdim=True) / nr, torch.zeros_like(nr))
        feats_t = (rt / (nr + NORM_EPS) - r * coef).to(feats.dtype)
        ent_t = torch.zeros((), dtype=feats.dtype, device=feats.device)
        if entropy and a_t is not None:
            ent_t = (entropy_grad(a) * a_t).mean().to(feats.dtype)
        return feats_t, None, ent_t


class _PixelClusterSimilarity(_SingleLevelFunction):
    generate_vmap_rule = True

    @staticmethod
    def forward(embeddings, prototypes, temperature, normalize):
        return _below_autograd(ops.pixel_cluster_similarity.default, embeddings, prototypes, temperature, normalize)

    @staticmethod
    def setup_context(ctx, inputs, output):
        embeddings, prototypes, temperature, normalize = inputs
        ctx.save_for_backward(embeddings, prototypes, output)
        _save_for_jvp(ctx, embeddings, prototypes, output)
        ctx.cfg = (temperature, normalize)

    @staticmethod
    def backward(ctx, grad_out):
        embeddings, prototypes, out = ctx.saved_tensors
        ge, gp = ops.pixel_cluster_similarity_backward(grad_out, embeddings, prototypes, out, *ctx.cfg)
        return ge, gp, None, None

    @staticmethod
    def jvp(ctx, embeddings_t, prototypes_t, *_):
        # l = <p_k, e> / tau, S = softmax_k(l): S' = S (l' - sum_k S l').
        embeddings, prototypes, out = ctx.saved_tensors
        temperature, normalize = ctx.cfg
        ct = compute_dtype(embeddings.dtype)
        n, d = embeddings.shape[0], embeddings.shape[1]
        z, z_t = flat3(embeddings, n, d, ct), flat3(embeddings_t, n, d, ct)
        e, e_t = normalize_jvp(z, z_t) if normalize else (z, z_t)

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
    op, backward_op = getattr(ops, name).default, getattr(ops, registry.backward(name))

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
        ot = out_dtype(x.dtype)
        g = backward_op(x.new_ones((), dtype=ot), x, ctx.temperature)
        return (g.to(ot) * x_t.to(ot)).sum()

    return _function_class(name, forward, setup_context, backward, jvp)


def _refusing_function(name: str):
    """The Function of a backward operator: not differentiable again, in either mode, said clearly."""
    op = getattr(ops, name).default

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


# Operator name -> its Function: every op of the registry, then every backward operator.
FUNCTIONS = {
    "region_features": _RegionFeatures,
    "region_discrimination": _scalar_loss_function("region_discrimination"),
    "pixel_cluster_similarity": _PixelClusterSimilarity,
    "patch_discrimination": _scalar_loss_function("patch_discrimination"),
}
FUNCTIONS.update({registry.backward(name): _refusing_function(registry.backward(name)) for name in registry.NAMES})
