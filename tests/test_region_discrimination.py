"""ld_ext.region_discrimination and RegionDiscriminationLoss against ld_ext.reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ld_ext
from ld_ext import reference as R

from conftest import TOL, assert_close_rel, max_err, rand_inputs


def _unit(n, k, d, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, k, d, dtype=torch.float64, generator=g)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


@given(n=st.integers(1, 6), k=st.integers(1, 9), d=st.integers(1, 12), tau=st.floats(0.05, 2.0))
def test_values_and_gradients_float64(n, k, d, tau):
    r = _unit(n, k, d).requires_grad_(True)
    loss = ld_ext.region_discrimination(r, tau)
    ref = R.region_discrimination(r, tau)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert_close_rel(loss, ref, rtol=1e-10, atol=1e-13)
    (g,) = torch.autograd.grad(loss, r)
    (rg,) = torch.autograd.grad(ref, r)
    # A centre c~_k that (nearly) cancels, e.g. D=1 where rows are exactly +-1, makes
    # c = c~/(||c~|| + 1e-10) amplify rounding noise by up to 1e10 in any implementation; the
    # tolerance follows that condition number.
    # When the rows cancel exactly (c~_k = 0, e.g. two antipodal rows), both gradients are rounding
    # noise times 1/(||c~|| + 1e-10) = 1e10 (and the reference's may be exactly 0), so the relative
    # rule has nothing to scale with: the absolute tolerance carries that amplification, eps * amp / tau.
    cnorm = r.detach().mean(0).norm(dim=-1).min().item()
    cond = max(1.0, 1e-4 / max(cnorm, 1e-10))
    amp = 1.0 / (cnorm + 1e-10)
    atol = 1e-13 + 16 * torch.finfo(torch.float64).eps * amp / tau  # measured up to 1.8 eps amp / tau
    assert_close_rel(g, rg, rtol=1e-9 * cond, atol=atol)


def test_published_formulation_agrees():
    z, s = rand_inputs(4, 8, 5, (12, 12), assignment="sigmoid")
    a = R.region_discrimination_loss(z, s, normalize=True, assignment="sigmoid")
    b = R.region_discrimination_loss_broadcast(z, s, normalize=True, assignment="sigmoid")
    c = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid")(z, s)
    assert_close_rel(a, b, rtol=1e-10)
    assert_close_rel(c, a, rtol=1e-10)


def test_centres_are_not_detached():
    r = _unit(3, 4, 5, seed=0).requires_grad_(True)
    (g,) = torch.autograd.grad(ld_ext.region_discrimination(r, 0.2), r)
    # detaching the centres gives a different gradient; ours must match the non-detached one
    c = torch.nn.functional.normalize(r.mean(0), dim=-1, eps=0).detach()
    logits = torch.einsum("nkd,jd->nkj", r, c) / 0.2
    det = torch.nn.functional.cross_entropy(logits.reshape(12, 4), torch.arange(4).repeat(3))
    (gd,) = torch.autograd.grad(det, r)
    (gr,) = torch.autograd.grad(R.region_discrimination(r, 0.2), r)
    assert max_err(g, gr) < 1e-12
    assert max_err(g, gd) > 1e-6


def test_gradcheck():
    r = _unit(3, 4, 5, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ld_ext.region_discrimination(x, 0.3), (r,))
    rnu = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)  # not unit rows
    assert torch.autograd.gradcheck(lambda x: ld_ext.region_discrimination(x, 0.2), (rnu,))


def test_float32_error_no_worse_than_plain_pytorch():
    r64 = _unit(16, 16, 32, seed=4)
    exact = ld_ext.region_discrimination(r64, 0.2)
    r32 = r64.float()
    assert max_err(ld_ext.region_discrimination(r32, 0.2), exact) <= max_err(R.region_discrimination(r32, 0.2), exact) + TOL[torch.float32]


@pytest.mark.parametrize("mode", ["probs", "sigmoid", "softmax"])
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_module_matches_reference(mode, normalize):
    z, s = rand_inputs(3, 6, 4, (7, 9), assignment=mode)
    z.requires_grad_(True)
    s.requires_grad_(True)
    mod = ld_ext.RegionDiscriminationLoss(temperature=0.3, normalize=normalize, assignment=mode, return_entropy=True)
    lrd, lent = mod(z, s)
    rrd, rent = R.region_discrimination_loss(z, s, temperature=0.3, normalize=normalize, assignment=mode, return_entropy=True)
    assert_close_rel(lrd, rrd, rtol=1e-10)
    assert_close_rel(lent, rent, rtol=1e-10)
    g = torch.autograd.grad(10 * lrd + 0.1 * lent, (z, s))
    rg = torch.autograd.grad(10 * rrd + 0.1 * rent, (z, s))
    for a, b in zip(g, rg):
        assert_close_rel(a, b, rtol=1e-9)
    plain = ld_ext.RegionDiscriminationLoss(temperature=0.3, normalize=normalize, assignment=mode)(z, s)
    assert torch.equal(plain, lrd)


def test_drop_in_for_published_compute_clustering_loss():
    """The published code: embeddings L2-normalised, attention = sigmoid output, L1-normalised with
    eps, region features by broadcast, centres from the batch, cross-entropy at tau = 0.2, and the
    entropy term. One fused call gives the same two numbers from the raw decoder outputs."""
    torch.manual_seed(0)
    z = torch.randn(4, 32, 16, 16, dtype=torch.float64)
    logits = torch.randn(4, 8, 16, 16, dtype=torch.float64)
    emb = z / (z.norm(dim=1, keepdim=True) + 1e-10)
    att = torch.sigmoid(logits) + 1e-9
    att = att / att.sum(dim=1, keepdim=True)
    rf = (emb[:, None] * att[:, :, None]).mean(dim=(3, 4))
    rf = rf / (rf.norm(dim=2, keepdim=True) + 1e-10)
    centres = rf.mean(dim=0)
    centres = centres / (centres.norm(dim=1, keepdim=True) + 1e-10)
    sim = torch.exp(torch.einsum("nkd,jd->nkj", rf, centres) / 0.2)
    published_rd = -torch.log(torch.diagonal(sim / sim.sum(2, keepdim=True), dim1=1, dim2=2)).mean()
    published_ent = (-att * torch.log2(att + 1e-30) - (1 - att) * torch.log2(1 - att + 1e-30)).mean()
    rd, ent = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)(z, logits)
    assert_close_rel(rd, published_rd, rtol=1e-10)
    assert_close_rel(ent, published_ent, rtol=1e-10)


def test_nan_in_gives_nan_out():
    r = _unit(2, 3, 4)
    r[1, 1, 1] = float("nan")
    assert torch.isnan(ld_ext.region_discrimination(r, 0.2))


def test_opcheck():
    r = _unit(3, 4, 5).requires_grad_(True)
    torch.library.opcheck(torch.ops.ld_ext.region_discrimination.default, (r, 0.2))
    torch.library.opcheck(torch.ops.ld_ext.region_discrimination.default, (r.detach().float(), 0.5))
    torch.library.opcheck(
        torch.ops.ld_ext.region_discrimination_backward.default, (torch.tensor(1.3, dtype=torch.float64), r.detach(), 0.2)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("tau", [1e-16, 1e-20, 1e-30, "min"])
def test_identical_features_at_tiny_temperature_give_log_k(dtype, k, tau):
    """Issue 25: every logit equal and about 1/tau; the row loss was formed as (max + log se) - l_k,
    where max + log se rounds back to max for 1/tau beyond 1/ulp, so the loss came out 0 (or 2)
    instead of log K and the softmax in the backward as 1 instead of 1/K."""
    tau = ld_ext.ops.MIN_TEMPERATURE if tau == "min" else tau
    r = _unit(1, 1, 5, seed=1).expand(3, k, 5).to(dtype).contiguous().requires_grad_(True)
    loss = ld_ext.region_discrimination(r, tau)
    r64 = r.detach().double().requires_grad_(True)
    ref = R.region_discrimination(r64, tau)
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    assert_close_rel(loss, torch.tensor(math.log(k), dtype=torch.float64), rtol=rtol)
    assert_close_rel(loss, ref, rtol=rtol)
    (g,) = torch.autograd.grad(loss, r)
    (rg,) = torch.autograd.grad(ref, r64)
    # The exact gradient is 0 (all centres equal); any implementation returns rounding noise times
    # 1/tau (the reference's too): bounded by a few eps of the dtype over tau.
    assert torch.isfinite(g).all()
    assert_close_rel(g, rg, rtol=0.0, atol=64 * torch.finfo(dtype).eps / tau)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distinct_features_at_tiny_temperature_match_reference(dtype):
    r = _unit(3, 4, 6, seed=5).to(dtype)
    for tau in (1e-16, 1e-30):
        loss = ld_ext.region_discrimination(r, tau)
        ref = R.region_discrimination(r.double(), tau)
        assert_close_rel(loss, ref, rtol=1e-12 if dtype == torch.float64 else 1e-6)


def test_gradcheck_small_temperature_near_identical_features():
    base = _unit(1, 1, 5, seed=3)
    r = (base + 1e-3 * torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    r = torch.nn.functional.normalize(r, dim=-1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ld_ext.region_discrimination(x, 1e-3), (r,))


def test_opcheck_tiny_temperature():
    r = _unit(1, 1, 5, seed=1).expand(3, 4, 5).contiguous().requires_grad_(True)
    torch.library.opcheck(torch.ops.ld_ext.region_discrimination.default, (r, 1e-20))
    grad = torch.tensor(1.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ld_ext.region_discrimination_backward.default, (grad, r.detach(), 1e-20))
