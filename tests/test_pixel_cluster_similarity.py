"""ld_ext.pixel_cluster_similarity against ld_ext.reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ld_ext
from ld_ext import reference as R

from conftest import TOL, assert_close_rel, max_err


def _inputs(n, d, k, spatial, shared, dtype=torch.float64):
    z = torch.randn(n, d, *spatial, dtype=torch.float64)
    p = torch.randn(k, d, dtype=torch.float64) if shared else torch.randn(n, k, d, dtype=torch.float64)
    return z.to(dtype), p.to(dtype)


@given(
    n=st.integers(1, 3),
    d=st.integers(1, 7),
    k=st.integers(1, 6),
    spatial=st.one_of(
        st.tuples(st.integers(1, 9)),
        st.tuples(st.integers(1, 10), st.integers(1, 10)),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)),
    ),
    shared=st.booleans(),
    normalize=st.booleans(),
    tau=st.floats(0.05, 2.0),
)
def test_values_and_gradients_float64(n, d, k, spatial, shared, normalize, tau):
    z, p = _inputs(n, d, k, spatial, shared)
    z.requires_grad_(True)
    p.requires_grad_(True)
    out = ld_ext.pixel_cluster_similarity(z, p, tau, normalize=normalize)
    ref = R.pixel_cluster_similarity(z, p, tau, normalize=normalize)
    assert out.shape == (n, k, *spatial)
    assert_close_rel(out, ref, rtol=1e-10, atol=1e-14)
    w = torch.randn_like(ref)
    g = torch.autograd.grad((out * w).sum(), (z, p))
    rg = torch.autograd.grad((ref * w).sum(), (z, p))
    for a, b in zip(g, rg):
        assert_close_rel(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(shared, normalize):
    z, p = _inputs(2, 3, 4, (3, 5), shared)
    z.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ld_ext.pixel_cluster_similarity(a, b, 0.4, normalize=normalize), (z, p))


@pytest.mark.parametrize("shared", [True, False])
def test_float32_error_no_worse_than_plain_pytorch(shared):
    z64, p64 = _inputs(3, 32, 16, (40, 37), shared)
    exact = ld_ext.pixel_cluster_similarity(z64, p64, 0.2, normalize=True)
    z32, p32 = z64.float(), p64.float()
    got = ld_ext.pixel_cluster_similarity(z32, p32, 0.2, normalize=True)
    ref = R.pixel_cluster_similarity(z32, p32, 0.2, normalize=True)
    assert got.dtype == torch.float32
    assert max_err(got, exact) <= max_err(ref, exact) + TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_no_worse_than_plain_pytorch(dtype):
    """float16/bfloat16 inputs: the backward recomputes S in float32 instead of using the rounded
    output, whose rounding S (g - <g, S>) would amplify where one S_k is near 1 (one pixel, K=2,
    random draws: many such cases among them)."""
    g = torch.Generator().manual_seed(7)
    worst = []
    for _ in range(200):
        z = torch.randn(1, 2, 1, dtype=torch.float64, generator=g).to(dtype)
        p = torch.nn.functional.normalize(torch.randn(1, 2, 2, dtype=torch.float64, generator=g), dim=-1).to(dtype)
        w = torch.randn(1, 2, 1, dtype=torch.float64, generator=g).to(dtype)
        grads = []
        for fn, dt in ((ld_ext.pixel_cluster_similarity, dtype), (R.pixel_cluster_similarity, dtype),
                       (R.pixel_cluster_similarity, torch.float64)):
            zz = z.detach().to(dt, copy=True).requires_grad_()
            pp = p.detach().to(dt, copy=True).requires_grad_()
            (fn(zz, pp, 0.2) * w.to(dt)).sum().backward()
            grads.append(torch.cat([zz.grad.double().flatten(), pp.grad.double().flatten()]))
        fused, plain, exact = grads
        scale = exact.norm().item() + 1e-3
        worst.append(((fused - exact).norm().item() - (plain - exact).norm().item()) / scale)
    assert max(worst) <= 2e-2, f"fused gradient error exceeds plain {dtype} by {max(worst):.3e} (relative)"


def test_large_p_and_determinism():
    z, p = _inputs(2, 8, 5, (250, 250), True, dtype=torch.float32)
    z.requires_grad_(True)
    p.requires_grad_(True)
    res = []
    for _ in range(2):
        out = ld_ext.pixel_cluster_similarity(z, p, 0.2, normalize=True)
        g = torch.autograd.grad((out * out.detach()).sum(), (z, p))
        res.append((out, *g))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    ref = R.pixel_cluster_similarity(z.double(), p.double(), 0.2, normalize=True)
    assert_close_rel(res[0][0], ref, rtol=1e-5, atol=1e-6)


def test_channels_last_and_region_features_as_prototypes():
    z = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    s = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    r = ld_ext.region_features(z, s, normalize=True, assignment="sigmoid")  # (N, K, D) per image
    a = ld_ext.pixel_cluster_similarity(z.to(memory_format=torch.channels_last), r, normalize=True)
    b = ld_ext.pixel_cluster_similarity(z, r, normalize=True)
    assert torch.equal(a, b)
    assert_close_rel(b.sum(dim=1), torch.ones(2, 9, 11, dtype=torch.float64), rtol=1e-12)


def test_nan_in_gives_nan_out():
    z, p = _inputs(1, 4, 3, (4, 4), True)
    z[0, 0, 2, 3] = float("nan")
    out = ld_ext.pixel_cluster_similarity(z, p, 0.2)
    assert torch.isnan(out[0, :, 2, 3]).all()
    assert not torch.isnan(out[0, :, 0, 0]).any()


def test_opcheck():
    for shared in (True, False):
        z, p = _inputs(2, 3, 4, (5, 6), shared)
        z.requires_grad_(True)
        p.requires_grad_(True)
        torch.library.opcheck(torch.ops.ld_ext.pixel_cluster_similarity.default, (z, p, 0.2, True))
        torch.library.opcheck(torch.ops.ld_ext.pixel_cluster_similarity.default, (z.detach().float(), p.detach().float(), 0.7, False))
        out = torch.ops.ld_ext.pixel_cluster_similarity(z.detach(), p.detach(), 0.2, True)
        torch.library.opcheck(
            torch.ops.ld_ext.pixel_cluster_similarity_backward.default,
            (torch.randn_like(out), z.detach(), p.detach(), out, 0.2, True),
        )


def test_grad_condition_flags_cancellation():
    """reference.pixel_cluster_similarity_grad_condition (used to size the CUDA tests' and the
    emulation's tolerances) is modest for generic inputs and large where the backward cancels."""
    torch.manual_seed(0)
    e = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    p = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=1)
    g = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for normalize in (False, True):
        ce, cp = R.pixel_cluster_similarity_grad_condition(e, p, g, 0.3, normalize=normalize)
        assert 1.0 <= ce < 1e3 and 1.0 <= cp < 1e3, (ce, cp)
    # Two prototypes equal up to 1e-9: g_e = P^T g_l cancels to ~1e-9 of its terms.
    p2 = torch.nn.functional.normalize(torch.randn(1, 8, dtype=torch.float64), dim=1).repeat(2, 1)
    p2[1, 0] += 1e-9
    ce, _ = R.pixel_cluster_similarity_grad_condition(e[:, :, :1, :1], p2, g[:, :2, :1, :1], 0.3)
    assert ce > 1e6, ce
    # One assignment near 1 (large logits): S (g - <g, S>) cancels.
    ce, cp = R.pixel_cluster_similarity_grad_condition(40 * e, p, g, 0.05)
    assert ce > 1e3 and cp > 1e3, (ce, cp)
    # Per-image prototypes (N, K, D) give the prototype condition per image summed the same way.
    ce3, cp3 = R.pixel_cluster_similarity_grad_condition(e, p.expand(2, -1, -1), g, 0.3)
    ce2, _ = R.pixel_cluster_similarity_grad_condition(e, p, g, 0.3)
    assert abs(ce3 - ce2) <= 1e-9 * ce2 and cp3 >= 1.0


def test_normalize_does_not_overflow_for_large_embeddings():
    """Issue 16 item 4: ||z||^2 overflowed (|z| >= 1.8e19 in float32, D = 1), which gave 1/K
    everywhere instead of the softmax of the unit embeddings."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 1, generator=g)
    z = torch.tensor([[[1e20, -1e20, 3e20, 2e19]]])
    out = ld_ext.pixel_cluster_similarity(z, p, normalize=True)
    ref = R.pixel_cluster_similarity(z.double(), p.double(), normalize=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out, torch.full_like(out, 1 / 3))
    # D > 1, spanning a range of magnitudes, with gradients; and float64 beyond 1e154
    for dtype, scale in ((torch.float32, 1e25), (torch.float64, 1e160)):
        z = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * scale).to(dtype)
        z[:, :, 0] = 0.0  # a zero pixel stays 0 (e = 0)
        pr = torch.randn(4, 5, generator=g, dtype=torch.float64).to(dtype)
        # PyTorch's own norm overflows too, so the reference gets z rescaled by an exact power of
        # two c (normalising is scale-invariant up to the 1e-10): f(z) = f(c z), grad = c grad(c z).
        c = 2.0**-500 if dtype == torch.float64 else 1.0
        zr = (z.double() * c).requires_grad_(True)
        ref = R.pixel_cluster_similarity(zr, pr.double(), 0.3, normalize=True)
        zz = z.clone().requires_grad_(True)
        out = ld_ext.pixel_cluster_similarity(zz, pr, 0.3, normalize=True)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        (gr,) = torch.autograd.grad((ref * w).sum(), zr)
        (gz,) = torch.autograd.grad((out * w.to(dtype)).sum(), zz)
        # (at the zero pixel the 1e-10 dominates: there the gradient does not scale)
        expected = torch.where(z.double() == 0, gr, gr * c)
        assert_close_rel(gz[..., 1:], expected[..., 1:], rtol=10 * tol)
        assert_close_rel(gz[..., 0], expected[..., 0], rtol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("tau", ["min", 3e-39, 1e-38, 1e-30])
def test_tiny_temperature_matches_float64_reference(dtype, shared, normalize, tau):
    """Issue 25: float32 at tau ~ 3e-39 gave NaN: the prototypes were scaled by 1/tau (about 3e38)
    before the products, which overflowed to inf, and inf - inf is NaN. The temperature now scales
    l - max l. The result is the one-hot argmax (no ties in these draws), gradients 0."""
    tau = ld_ext.ops.MIN_TEMPERATURE if tau == "min" else tau
    z, p = _inputs(2, 3, 4, (5, 6), shared)
    z, p = z.to(dtype).requires_grad_(True), p.to(dtype).requires_grad_(True)
    out = ld_ext.pixel_cluster_similarity(z, p, tau, normalize=normalize)
    z64, p64 = z.detach().double().requires_grad_(True), p.detach().double().requires_grad_(True)
    ref = R.pixel_cluster_similarity(z64, p64, tau, normalize=normalize)
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, rtol=0.0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad((out * w.to(dtype)).sum(), (z, p))
    rg = torch.autograd.grad((ref * w).sum(), (z64, p64))
    for a, b in zip(g, rg):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, rtol=0.0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_gradcheck_small_temperature():
    z, p = _inputs(2, 3, 4, (3, 5), True)
    z.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ld_ext.pixel_cluster_similarity(a, b, 0.01), (z, p))


def test_opcheck_tiny_temperature():
    z, p = _inputs(2, 3, 4, (3, 5), True)
    z.requires_grad_(True)
    p.requires_grad_(True)
    tau = ld_ext.ops.MIN_TEMPERATURE
    torch.library.opcheck(torch.ops.ld_ext.pixel_cluster_similarity.default, (z.float(), p.float(), tau, True))
    torch.library.opcheck(torch.ops.ld_ext.pixel_cluster_similarity.default, (z, p, tau, False))
    out = torch.ops.ld_ext.pixel_cluster_similarity(z.detach(), p.detach(), tau, False)
    torch.library.opcheck(
        torch.ops.ld_ext.pixel_cluster_similarity_backward.default,
        (torch.randn_like(out), z.detach(), p.detach(), out, tau, False),
    )
