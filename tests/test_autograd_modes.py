"""Every op under torch.func (grad, vjp, jvp, jacrev, jacfwd) and torch.autograd.forward_ad.

Forward-mode tangents are checked against central finite differences (float64, 1e-6) and against
forward-mode AD of ld_ext.reference; reverse-mode transforms against torch.autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import ld_ext
from ld_ext import reference as R

MODES = ["probs", "sigmoid", "softmax"]


def _fd(f, x, v, h=1e-6):
    """Central finite difference of f at x along v (f returns a tensor)."""
    with torch.no_grad():
        return (f(x + h * v) - f(x - h * v)) / (2 * h)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rf_inputs(seed, mode):
    g = _gen(seed)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    s = torch.randn(2, 4, 4, 5, dtype=torch.float64, generator=g)
    if mode == "probs":
        s = torch.softmax(s, dim=1)
    return z, s


def _check_jvp(f, ref, x, v, atol=1e-6):
    out, tangent = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, f(x), rtol=1e-12, atol=1e-12)
    fd = _fd(f, x, v)
    assert (tangent - fd).abs().max().item() <= atol * max(1.0, fd.abs().max().item()), (tangent, fd)
    _, ref_tangent = torch.func.jvp(ref, (x,), (v,))
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-9, atol=1e-10)
    assert tangent.abs().max().item() > 0  # the issue: zero tangents


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_region_features_jvp(mode, normalize):
    z, s = _rf_inputs(0, mode)
    g = _gen(1)
    vz, vs = torch.randn(z.shape, dtype=z.dtype, generator=g), torch.randn(s.shape, dtype=s.dtype, generator=g)
    kw = dict(normalize=normalize, assignment=mode)
    _check_jvp(lambda a: ld_ext.region_features(a, s, **kw), lambda a: R.region_features(a, s, **kw), z, vz)
    _check_jvp(lambda b: ld_ext.region_features(z, b, **kw), lambda b: R.region_features(z, b, **kw), s, vs)
    # the entropy output, and both inputs at once
    ent = lambda a, b: ld_ext.region_features_and_entropy(a, b, **kw)[1]  # noqa: E731
    ent_ref = lambda a, b: R.assignment_entropy(b, mode)  # noqa: E731
    _, t = torch.func.jvp(ent, (z, s), (vz, vs))
    _, t_ref = torch.func.jvp(ent_ref, (z, s), (vz, vs))
    torch.testing.assert_close(t, t_ref, rtol=1e-9, atol=1e-12)
    feats = lambda a, b: ld_ext.region_features(a, b, **kw)  # noqa: E731
    _, t = torch.func.jvp(feats, (z, s), (vz, vs))
    fd = _fd(lambda u: feats(z + u * vz, s + u * vs), torch.zeros((), dtype=z.dtype), torch.ones((), dtype=z.dtype))
    assert (t - fd).abs().max().item() <= 1e-6


def test_region_discrimination_loss_jvp():
    """Issue reproducer: RegionDiscriminationLoss's forward-mode derivative was 0.0."""
    z, s = _rf_inputs(2, "sigmoid")
    v = torch.ones_like(z)
    crit = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid")
    ref = lambda a: R.region_discrimination_loss(a, s, normalize=True, assignment="sigmoid")  # noqa: E731
    _check_jvp(lambda a: crit(a, s), ref, z, v)


def test_region_discrimination_jvp():
    f = torch.randn(3, 4, 5, dtype=torch.float64, generator=_gen(3))
    v = torch.randn(f.shape, dtype=f.dtype, generator=_gen(4))
    _check_jvp(lambda a: ld_ext.region_discrimination(a, 0.3), lambda a: R.region_discrimination(a, 0.3), f, v)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_pixel_cluster_similarity_jvp(shared, normalize):
    g = _gen(5)
    z = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=g)
    p = torch.randn(*(() if shared else (2,)), 4, 3, dtype=torch.float64, generator=g)
    vz, vp = torch.randn(z.shape, dtype=z.dtype, generator=g), torch.randn(p.shape, dtype=p.dtype, generator=g)
    kw = dict(normalize=normalize)
    _check_jvp(lambda a: ld_ext.pixel_cluster_similarity(a, p, 0.5, **kw),
               lambda a: R.pixel_cluster_similarity(a, p, 0.5, **kw), z, vz)
    _check_jvp(lambda b: ld_ext.pixel_cluster_similarity(z, b, 0.5, **kw),
               lambda b: R.pixel_cluster_similarity(z, b, 0.5, **kw), p, vp)


def _pd_held(y, x0, temperature):
    """The published criterion with the gradient side y and the stop-gradient side held at x0."""
    m = y.shape[0]
    half = m // 2
    other = torch.cat((x0[half:], x0[:half]), 0)
    pos = torch.exp((y * other).sum(1) / temperature)
    all_prob = torch.exp(y @ x0.t() / temperature) * (1 - torch.eye(m, dtype=y.dtype))
    all_div = all_prob.sum(1) + R.PD_EPS
    p_pos = pos / all_div
    neg = torch.log(1 - all_prob / all_div[:, None]).sum(1) - torch.log(1 - p_pos)
    return -(torch.log(p_pos).sum(0) + neg.sum(0)) / m


def test_patch_discrimination_jvp_is_the_stop_gradient_derivative():
    """The op's derivative leaves out the stop-gradient side (as published, and as its backward):
    jvp = <grad, v> = the finite difference with that side held, = forward AD of the reference."""
    x = F.normalize(torch.randn(8, 4, dtype=torch.float64, generator=_gen(6)), dim=1)
    v = torch.ones_like(x)
    f = lambda a: ld_ext.patch_discrimination(a, 0.5)  # noqa: E731
    _, tangent = torch.func.jvp(f, (x,), (v,))
    fd_held = _fd(lambda a: _pd_held(a, x, 0.5), x, v)
    assert abs(tangent.item() - fd_held.item()) <= 1e-6 * max(1.0, abs(fd_held.item()))
    _, ref_tangent = torch.func.jvp(lambda a: R.patch_discrimination(a, 0.5), (x,), (v,))
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-9, atol=1e-10)
    grad = torch.func.grad(f)(x)
    torch.testing.assert_close(tangent, (grad * v).sum(), rtol=1e-12, atol=1e-12)
    assert tangent.item() != 0.0


def _ops_and_refs():
    z, s = _rf_inputs(7, "sigmoid")
    p = torch.randn(4, 3, dtype=torch.float64, generator=_gen(8))
    feats = torch.randn(3, 4, 5, dtype=torch.float64, generator=_gen(9))
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64, generator=_gen(10)), dim=1)
    kw = dict(normalize=True, assignment="sigmoid")
    return [
        ("region_features", lambda a: ld_ext.region_features(a, s, **kw).square().sum(),
         lambda a: R.region_features(a, s, **kw).square().sum(), z),
        ("region_features_s", lambda b: ld_ext.region_features_and_entropy(z, b, **kw)[1],
         lambda b: R.assignment_entropy(b, "sigmoid"), s),
        ("region_discrimination", lambda f: ld_ext.region_discrimination(f, 0.2),
         lambda f: R.region_discrimination(f, 0.2), feats),
        ("pixel_cluster_similarity", lambda a: ld_ext.pixel_cluster_similarity(a, p, normalize=True).square().sum(),
         lambda a: R.pixel_cluster_similarity(a, p, normalize=True).square().sum(), z),
        ("pixel_cluster_similarity_p", lambda b: ld_ext.pixel_cluster_similarity(z, b).square().sum(),
         lambda b: R.pixel_cluster_similarity(z, b).square().sum(), p),
        ("patch_discrimination", lambda a: ld_ext.patch_discrimination(a, 0.1),
         lambda a: R.patch_discrimination(a, 0.1), x),
    ]


@pytest.mark.parametrize("case", _ops_and_refs(), ids=lambda c: c[0])
def test_func_grad_and_vjp(case):
    _, f, ref, x = case
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref(xr), xr)
    g = torch.func.grad(f)(x)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-11)
    out, vjp_fn = torch.func.vjp(f, x)
    torch.testing.assert_close(out, f(x), rtol=1e-12, atol=1e-12)
    (gv,) = vjp_fn(torch.full_like(out, 2.0))
    torch.testing.assert_close(gv, 2 * expected, rtol=1e-9, atol=1e-11)


def test_jacrev_and_jacfwd_agree():
    z = torch.randn(1, 2, 3, dtype=torch.float64, generator=_gen(11))
    p = torch.randn(3, 2, dtype=torch.float64, generator=_gen(12))
    f = lambda a: ld_ext.pixel_cluster_similarity(a, p, 0.4, normalize=True)  # noqa: E731
    jr = torch.func.jacrev(f)(z)
    jf = torch.func.jacfwd(f)(z)
    jref = torch.func.jacrev(lambda a: R.pixel_cluster_similarity(a, p, 0.4, normalize=True))(z)
    torch.testing.assert_close(jr, jref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(jf, jref, rtol=1e-9, atol=1e-11)


def test_forward_ad_dual_tensors():
    feats = torch.randn(2, 3, 4, dtype=torch.float64, generator=_gen(13))
    v = torch.randn(feats.shape, dtype=feats.dtype, generator=_gen(14))
    with fwAD.dual_level():
        out = ld_ext.region_discrimination(fwAD.make_dual(feats, v), 0.2)
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.func.jvp(lambda f: R.region_discrimination(f, 0.2), (feats,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-11)


def test_float32_jvp_close_to_float64():
    z, s = _rf_inputs(15, "softmax")
    v = torch.randn(z.shape, dtype=z.dtype, generator=_gen(16))
    f = lambda a, b: ld_ext.region_features(a, b, normalize=True, assignment="softmax")  # noqa: E731
    _, t64 = torch.func.jvp(lambda a: f(a, s), (z,), (v,))
    _, t32 = torch.func.jvp(lambda a: f(a, s.float()), (z.float(),), (v.float(),))
    assert t32.dtype == torch.float32
    assert (t32.double() - t64).abs().max().item() < 1e-4


def test_second_order_is_refused_clearly():
    """The fused ops have no second derivatives: nested differentiation raises instead of silently
    giving zeros (their autograd nodes live at one torch.func level)."""
    x = F.normalize(torch.randn(6, 3, dtype=torch.float64, generator=_gen(17)), dim=1)
    v = torch.ones_like(x)
    f = lambda a: ld_ext.patch_discrimination(a, 0.1)  # noqa: E731
    nested = [
        lambda: torch.func.grad(lambda a: torch.func.grad(f)(a).sum())(x),
        lambda: torch.func.hessian(f)(x),
        lambda: torch.func.jacrev(torch.func.jacrev(f))(x),
        lambda: torch.func.grad(lambda a: torch.func.jvp(f, (a,), (v,))[1])(x),
        lambda: torch.func.jvp(lambda a: torch.func.jvp(f, (a,), (v,))[1], (x,), (v,)),
        # torch.autograd through a torch.func transform
        lambda: torch.func.grad(f)(x.clone().requires_grad_(True)),
    ]
    for call in nested:
        with pytest.raises(RuntimeError, match="nested differentiation"):
            call()


def test_vmap_is_transparent_to_autograd():
    xs = F.normalize(torch.randn(3, 6, 3, dtype=torch.float64, generator=_gen(18)), dim=-1).requires_grad_(True)
    out = torch.func.vmap(lambda a: ld_ext.patch_discrimination(a, 0.1))(xs)
    (g,) = torch.autograd.grad(out.sum(), xs)
    xr = xs.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(sum(R.patch_discrimination(xr[i], 0.1) for i in range(3)), xr)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11)
