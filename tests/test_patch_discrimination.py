"""ld_ext.patch_discrimination / PatchDiscriminationLoss against ld_ext.reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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


# ---- the blocked CPU path: rows in blocks of 4, logit rows padded to a multiple of 32 (float) or
# 16 (double) columns, D padded to the vector width in backward; partial blocks and padding must
# not leak into the result.


def _value_and_grad(fn, x, tau):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, tau)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def test_odd_sizes_float64():
    # M = 2 (one negative-free pair), M not a multiple of the 4-row block or of the lane count,
    # D below, at and above one vector.
    for m, d in [(2, 1), (2, 7), (6, 3), (34, 17), (66, 33), (130, 1), (98, 16), (18, 40)]:
        x = _rows(m, d)
        loss, g = _value_and_grad(ld_ext.patch_discrimination, x, 0.2)
        ref, rg = _value_and_grad(R.patch_discrimination, x, 0.2)
        assert_close_rel(loss, ref, rtol=1e-10, atol=1e-12)
        assert_close_rel(g, rg, rtol=1e-9, atol=1e-12)


def test_odd_sizes_float32_no_worse_than_plain_pytorch():
    for m, d in [(2, 5), (34, 17), (130, 33), (1022, 32)]:
        x64 = _rows(m, d)
        exact, gexact = _value_and_grad(ld_ext.patch_discrimination, x64, 0.1)
        got, g = _value_and_grad(ld_ext.patch_discrimination, x64.float(), 0.1)
        ref32, rg32 = _value_and_grad(R.patch_discrimination, x64.float(), 0.1)
        assert got.dtype == g.dtype == torch.float32
        tol = TOL[torch.float32]
        assert max_err(got, exact) <= max_err(ref32, exact) + tol * abs(exact.item())
        assert max_err(g, gexact) <= max_err(rg32, gexact) + tol * gexact.abs().max().item()


def test_large_m_float32():
    # M = 4096 rows (the PD size of B = 16 images): the float32 loss and gradient are no less
    # accurate than PyTorch's float32 computation of the same formula.
    x64 = _rows(4096, 32)
    exact, gexact = _value_and_grad(ld_ext.patch_discrimination, x64, 0.1)
    got, g = _value_and_grad(ld_ext.patch_discrimination, x64.float(), 0.1)
    ref32, rg32 = _value_and_grad(R.patch_discrimination, x64.float(), 0.1)
    tol = TOL[torch.float32]
    assert max_err(got, exact) <= max_err(ref32, exact) + tol * abs(exact.item())
    assert max_err(g, gexact) <= max_err(rg32, gexact) + tol * gexact.abs().max().item()
    # and the float64 op at this size against the float64 reference (value only: the reference
    # gradient at M = 4096 adds nothing the smaller cases do not check)
    assert_close_rel(exact, R.patch_discrimination(x64, 0.1), rtol=1e-10)


def test_same_bits_for_any_thread_count():
    old = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.float64):
            x = _rows(1030, 24, dtype)
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(_value_and_grad(ld_ext.patch_discrimination, x, 0.1))
            for loss, g in results[1:]:
                assert torch.equal(loss, results[0][0])
                assert torch.equal(g, results[0][1])
    finally:
        torch.set_num_threads(old)


def test_nan_anywhere_gives_nan_loss_and_gradient():
    # A NaN in one row reaches every row's logits (through its column), so every gradient row is NaN.
    for dtype in (torch.float32, torch.float64):
        for m, row in [(2, 1), (70, 0), (70, 69), (1030, 517)]:
            x = _rows(m, 9, dtype)
            x[row, 4] = float("nan")
            loss, g = _value_and_grad(ld_ext.patch_discrimination, x, 0.1)
            assert torch.isnan(loss)
            assert torch.isnan(g).all()


def test_infinite_input_follows_reference():
    # An inf entry makes the row maximum infinite (rows leave the blocked path); the result is not
    # finite, as in the reference.
    for dtype in (torch.float32, torch.float64):
        x = _rows(40, 6, dtype)
        x[5] = 0.0
        x[5, 0] = float("inf")
        loss = ld_ext.patch_discrimination(x, 0.1)
        ref = R.patch_discrimination(x, 0.1)
        assert not torch.isfinite(ref)
        assert not torch.isfinite(loss)


def test_one_negative_takes_the_row():
    # Rows with an exact duplicate among their negatives (or as positive and negative at once) and a
    # small temperature: 1 - p of that negative is ~e^-(1 - cos)/T, far below float precision, and the
    # odds 1/rest of the gradient reach ~1e40; the loss and the gradient must stay accurate (no
    # cancellation of those odds against p R), in float64 and in float32.
    x = _rows(64, 6)
    x[5] = x[2]
    x[40] = x[2]  # row 2's positive is row 34; 40 duplicates 2 and 5 among the negatives
    x[9] = x[41]  # 9 and 41 are a positive pair and equal
    for tau in (0.05, 0.01, 0.004):
        ref, rg = _value_and_grad(R.patch_discrimination, x, tau)
        loss, g = _value_and_grad(ld_ext.patch_discrimination, x, tau)
        assert_close_rel(loss, ref, rtol=1e-10)
        assert_close_rel(g, rg, rtol=1e-9)
        got32, g32 = _value_and_grad(ld_ext.patch_discrimination, x.float(), tau)
        ref32, rg32 = _value_and_grad(R.patch_discrimination, x.float(), tau)
        assert torch.isfinite(got32) and torch.isfinite(g32).all()
        # Any float32 formulation rounds the logits x.x/T by about eps32/T (relative), and the two
        # formulations round differently: beside the usual slack, allow that much (at T = 0.004 the
        # fused gradient error was up to 1.6x the plain one, about 2e-5 apart, in 1 draw in 10).
        # The plain float32 reference itself gives a NaN gradient in about 1 draw in 75 at T = 0.004
        # (4 of 300 seeds); its error is then no yardstick, and the fused result must be within the
        # slack alone (it was 5e-5 at most, the slack 2.3e-4, in those draws).
        tol = TOL[torch.float32] + torch.finfo(torch.float32).eps / tau
        base_loss = max_err(ref32, ref) if torch.isfinite(ref32) else 0.0
        base_grad = max_err(rg32, rg) if torch.isfinite(rg32).all() else 0.0
        assert max_err(got32, ref) <= base_loss + tol * abs(ref.item())
        assert max_err(g32, rg) <= base_grad + tol * rg.abs().max().item()


def test_loss_beyond_float32_range_is_inf_not_an_error():
    """Issue 16 item 4: a loss beyond float32's range raised "value cannot be converted to type
    float without overflow"; it is now rounded like any float32 result (to inf), and the float64
    op gives the float64 reference's value."""
    x = F.normalize(torch.randn(8, 1, generator=torch.Generator().manual_seed(0)), dim=1) * 1e30
    ref64 = R.patch_discrimination(x.double(), 0.5)
    assert torch.isfinite(ref64) and ref64.item() > 3.5e38  # beyond float32
    loss = ld_ext.patch_discrimination(x, 0.5)
    assert loss.dtype == torch.float32 and loss.item() == ref64.float().item() == float("inf")
    loss64 = ld_ext.patch_discrimination(x.double(), 0.5)
    assert_close_rel(loss64, ref64, rtol=1e-12)
    r = torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(1)) * 1e30
    ref = R.region_discrimination(r.double(), 1e-10)
    assert torch.isfinite(ref) and ref.item() > 3.5e38
    assert ld_ext.region_discrimination(r, 1e-10).item() == float("inf")
    assert_close_rel(ld_ext.region_discrimination(r.double(), 1e-10), ref, rtol=1e-12)


def _anti_aligned(d=6, seed=0):
    u = F.normalize(torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), dim=1)
    return torch.cat([u, -u])


def _simplex(m):
    """m unit rows in m dims with pairwise inner products -1/(m-1): every logit of every row is
    -1/((m-1) T), far below log 1e-10 at a small T."""
    e = torch.eye(m, dtype=torch.float64)
    return F.normalize(e - e.mean(0, keepdim=True), dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [1e-3, 1e-4, 1e-30, "min"])
def test_every_logit_far_below_log_eps(dtype, tau):
    """Issue 25: M=2 anti-aligned rows at T <= 1e-3 gave an infinite loss and NaN gradients, the
    reference an infinite loss: 1e-10 exp(-max) overflowed. Exactly, each row's loss is
    -log(e^s / (e^s + 1e-10)) = -s + log(1e-10 + e^s) with s = <x_0, x_1>/T ~ -1/T (finite), and the
    gradient of row i is -(1 - p) x_i' / (M T) (M = 2)."""
    tau = ld_ext.ops.MIN_TEMPERATURE if tau == "min" else tau
    x = _anti_aligned().to(dtype).requires_grad_(True)
    loss, g = _value_and_grad(ld_ext.patch_discrimination, x, tau)
    x64 = x.detach().double()
    ref, rg = _value_and_grad(R.patch_discrimination, x64, tau)
    s = (x64[0] @ x64[1]).item() / tau  # -1/T up to the rounding of the rows
    exact = -s + math.log(1e-10 + math.exp(s))
    p = math.exp(s) / (math.exp(s) + 1e-10)
    exact_g = -(1 - p) * x64.flip(0) / (2 * tau)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert_close_rel(ref, torch.tensor(exact, dtype=torch.float64), rtol=1e-12)
    assert_close_rel(rg, exact_g, rtol=1e-12)
    assert_close_rel(loss, ref, rtol=rtol)
    assert_close_rel(g, rg, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [4, 6])
def test_simplex_rows_at_small_temperature_match_reference(dtype, m):
    x = _simplex(m)
    for tau in (1e-3, 1e-6):
        ref, rg = _value_and_grad(R.patch_discrimination, x, tau)
        loss, g = _value_and_grad(ld_ext.patch_discrimination, x.to(dtype), tau)
        assert torch.isfinite(ref) and torch.isfinite(loss) and torch.isfinite(g).all()
        # float32: the logits -1/((m-1) T) carry a rounding of about eps32 / T
        rtol = 1e-10 if dtype == torch.float64 else 1e-6
        assert_close_rel(loss, ref, rtol=rtol)
        assert_close_rel(g, rg, rtol=rtol, atol=0.0 if dtype == torch.float64 else 8 * torch.finfo(dtype).eps / tau)


def test_gradcheck_every_logit_below_log_eps():
    # As test_gradcheck (stop-gradient: gradcheck the two-argument form, whose plain exp is still
    # finite here, then compare), at temperatures where every logit is below log 1e-10 (shifted).
    g = torch.Generator().manual_seed(5)
    for x0, tau in ((_anti_aligned(4, seed=1), 0.02), (_simplex(4), 0.01)):
        x = F.normalize(x0 + 1e-2 * torch.randn(x0.shape, dtype=torch.float64, generator=g), dim=1)
        assert (x @ x.t() / tau).fill_diagonal_(-math.inf).max() < math.log(1e-10)
        c = x.clone()
        first = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, c=c, tau=tau: _criterion_two_args(a, c, tau), (first,))
        (expected,) = torch.autograd.grad(_criterion_two_args(first, c, tau), first)
        for fn in (ld_ext.patch_discrimination, R.patch_discrimination):
            loss, got = _value_and_grad(fn, x, tau)
            assert_close_rel(loss, _criterion_two_args(x, c, tau), rtol=1e-12)
            assert_close_rel(got, expected, rtol=1e-10)


def test_opcheck_every_logit_below_log_eps():
    x = _anti_aligned().requires_grad_(True)
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination.default, (x, 1e-3))
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination.default, (x.detach().float(), 1e-4))
    grad = torch.tensor(0.7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ld_ext.patch_discrimination_backward.default, (grad, x.detach(), 1e-3))
