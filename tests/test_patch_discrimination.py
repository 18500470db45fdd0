"""ld_ext.patch_discrimination / PatchDiscriminationLoss against ld_ext.reference."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import ld_ext
from ld_ext import reference as R

from conftest import TOL, assert_close_rel, max_err


def _rows(m, d, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)


@given(half=st.integers(1, 12), d=st.integers(1, 9), tau=st.floats(0.05, 1.0))
def test_values_and_gradients_float64(half, d, tau):
    x = _rows(2 * half, d).requires_grad_(True)
    loss = ld_ext.patch_discrimination(x, tau)
    ref = R.patch_discrimination(x, tau)
    assert_close_rel(loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, x)
    (rg,) = torch.autograd.grad(ref, x)
    # The gradient holds p/(1-p) terms; when one negative takes almost all of a row's mass (tiny
    # temperature, D=1 rows that are exactly +-1) they are huge and cancel, so any two exact-math-
    # equivalent formulations differ by rounding x that odds ratio; the tolerance follows it.
    p = torch.softmax((x @ x.t() / tau).detach().fill_diagonal_(float("-inf")), dim=1)
    cond = max(1.0, (p / (1 - p).clamp_min(1e-300)).max().item())
    assert_close_rel(g, rg, rtol=1e-9 * cond, atol=1e-12)


def test_matches_published_criterion():
    x = _rows(64, 16).requires_grad_(True)
    loss = ld_ext.PatchDiscriminationLoss()(x)
    pub = R.patch_discrimination_published(x, 0.1)
    assert_close_rel(loss, pub, rtol=1e-10)
    (g,) = torch.autograd.grad(loss, x)
    (pg,) = torch.autograd.grad(pub, x)
    assert_close_rel(g, pg, rtol=1e-8)


def test_stable_where_published_overflows():
    # Identical positive pairs and a tiny temperature: exp(1/T) overflows in the published form.
    base = _rows(4, 8)
    x = torch.cat([base, base]).float().requires_grad_(True)
    loss = ld_ext.patch_discrimination(x, 0.01)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert not torch.isfinite(R.patch_discrimination_published(x.detach(), 0.01))


def _criterion_two_args(first, second, tau):
    """The criterion with the stop-gradient side as a separate argument: L(x) = f(x, sg(x))."""
    m = first.shape[0]
    sims = first @ second.t() / tau
    eye = torch.eye(m, dtype=torch.bool)
    q = torch.exp(sims).masked_fill(eye, 0.0)
    z = q.sum(1, keepdim=True) + 1e-10
    p = q / z
    pos = (torch.arange(m) + m // 2) % m
    neg = ~eye
    neg[torch.arange(m), pos] = False
    f = torch.log(p[torch.arange(m), pos]) + torch.where(neg, torch.log1p(-p), torch.zeros_like(p)).sum(1)
    return -f.sum() / m


def test_gradcheck():
    # The op's gradient is d f(x, c)/dx at c = x (stop-gradient on the second argument), so a plain
    # gradcheck of x -> op(x) does not apply. gradcheck the two-argument form numerically, then check
    # that the op's analytic gradient equals it.
    x = _rows(6, 4)
    c = x.clone()
    first = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: _criterion_two_args(a, c, 0.3), (first,))
    (expected,) = torch.autograd.grad(_criterion_two_args(first, c, 0.3), first)
    xr = x.clone().requires_grad_(True)
    loss = ld_ext.patch_discrimination(xr, 0.3)
    assert_close_rel(loss, _criterion_two_args(x, c, 0.3), rtol=1e-12)
    (got,) = torch.autograd.grad(loss, xr)
    assert_close_rel(got, expected, rtol=1e-10)


def test_float32_error_no_worse_than_plain_pytorch():
    x64 = _rows(256, 32)
    exact = ld_ext.patch_discrimination(x64, 0.1)
    x32 = x64.float()
    got = ld_ext.patch_discrimination(x32, 0.1)
    assert got.dtype == torch.float32
    assert max_err(got, exact) <= max_err(R.patch_discrimination(x32, 0.1), exact) + TOL[torch.float32] * abs(exact.item())


def test_deterministic_and_nan():
    x = _rows(128, 16, torch.float32).requires_grad_(True)
    a = torch.autograd.grad(ld_ext.patch_discrimination(x), x)[0]
    b = torch.autograd.grad(ld_ext.patch_discrimination(x), x)[0]
    assert torch.equal(a, b)
    y = x.detach().clone()
    y[3, 0] = float("nan")
    assert torch.isnan(ld_ext.patch_discrimination(y))


def test_opcheck():
    x = _rows(8, 5).requires_grad_(True)
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination.default, (x, 0.1))
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination.default, (x.detach().float(), 0.2))
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination_backward.default, (torch.tensor(0.7, dtype=torch.float64), x.detach(), 0.1))
