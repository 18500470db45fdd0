"""ld_ext.region_features / region_features_and_entropy against ld_ext.reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ld_ext
from ld_ext import reference as R

from conftest import TOL, assert_close_rel, max_err, rand_inputs

MODES = ["probs", "sigmoid", "softmax"]
SPATIAL = [(7,), (5, 9), (3, 4, 5)]  # 1D, 2D image, 3D volume


def _weighted_sum(feats, ent, w, c=3.0):
    return (feats * w).sum() + c * ent


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("spatial", SPATIAL, ids=lambda s: f"{len(s)}d")
def test_float64_matches_both_references(mode, normalize, spatial):
    z, s = rand_inputs(3, 5, 4, spatial, assignment=mode)
    feats, ent = ld_ext.region_features_and_entropy(z, s, normalize=normalize, assignment=mode)
    ref_bmm = R.region_features_bmm(z, s, normalize=normalize, assignment=mode)
    ref_bc = R.region_features_broadcast(z, s, normalize=normalize, assignment=mode)
    assert feats.shape == (3, 4, 5) and feats.dtype == torch.float64
    assert_close_rel(feats, ref_bmm, rtol=1e-10)
    assert_close_rel(feats, ref_bc, rtol=1e-10)
    assert_close_rel(ent, R.assignment_entropy(s, mode), rtol=1e-10)
    # region_features alone gives the same features
    assert torch.equal(ld_ext.region_features(z, s, normalize=normalize, assignment=mode), feats)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("spatial", SPATIAL, ids=lambda s: f"{len(s)}d")
def test_float64_gradients_match_reference(mode, normalize, spatial):
    z, s = rand_inputs(2, 4, 3, spatial, assignment=mode)
    z.requires_grad_(True)
    s.requires_grad_(True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    feats, ent = ld_ext.region_features_and_entropy(z, s, normalize=normalize, assignment=mode)
    gz, gs = torch.autograd.grad(_weighted_sum(feats, ent, w), (z, s))
    rf = R.region_features_bmm(z, s, normalize=normalize, assignment=mode)
    re = R.assignment_entropy(s, mode)
    rgz, rgs = torch.autograd.grad(_weighted_sum(rf, re, w), (z, s))
    assert_close_rel(gz, rgz, rtol=1e-10)
    assert_close_rel(gs, rgs, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(mode, normalize):
    z, s = rand_inputs(2, 3, 3, (3, 4), assignment=mode, seed=1)
    z.requires_grad_(True)
    s.requires_grad_(True)

    def fn(z_, s_):
        return ld_ext.region_features_and_entropy(z_, s_, normalize=normalize, assignment=mode)

    assert torch.autograd.gradcheck(fn, (z, s), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_float32_error_no_worse_than_plain_pytorch(mode, normalize):
    z64, s64 = rand_inputs(4, 16, 8, (33, 31), assignment=mode)
    z64.requires_grad_(True)
    s64.requires_grad_(True)
    w = torch.randn(4, 8, 16, dtype=torch.float64)
    f64, e64 = ld_ext.region_features_and_entropy(z64, s64, normalize=normalize, assignment=mode)
    g64 = torch.autograd.grad(_weighted_sum(f64, e64, w), (z64, s64))

    z32 = z64.detach().float().requires_grad_(True)
    s32 = s64.detach().float().requires_grad_(True)
    f32, e32 = ld_ext.region_features_and_entropy(z32, s32, normalize=normalize, assignment=mode)
    g32 = torch.autograd.grad(_weighted_sum(f32, e32, w.float()), (z32, s32))
    rf32 = R.region_features_bmm(z32, s32, normalize=normalize, assignment=mode)
    re32 = R.assignment_entropy(s32, mode)
    rg32 = torch.autograd.grad(_weighted_sum(rf32, re32, w.float()), (z32, s32))
    assert f32.dtype == torch.float32 and e32.dtype == torch.float32
    tol = TOL[torch.float32]
    assert max_err(f32, f64) <= max_err(rf32, f64) + tol
    assert max_err(e32, e64) <= max_err(re32, e64) + tol
    for got, ref, exact in zip(g32, rg32, g64):
        scale = exact.abs().max().item()
        assert max_err(got, exact) <= max_err(ref, exact) + tol * scale


@given(
    n=st.integers(1, 3),
    d=st.integers(1, 6),
    k=st.integers(1, 5),
    spatial=st.one_of(
        st.tuples(st.integers(1, 9)),
        st.tuples(st.integers(1, 11), st.integers(1, 11)),
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)),
    ),
    mode=st.sampled_from(MODES),
    normalize=st.booleans(),
)
def test_hypothesis_shapes_float64(n, d, k, spatial, mode, normalize):
    z, s = rand_inputs(n, d, k, spatial, assignment=mode)
    z.requires_grad_(True)
    s.requires_grad_(True)
    feats, ent = ld_ext.region_features_and_entropy(z, s, normalize=normalize, assignment=mode)
    rf = R.region_features_bmm(z, s, normalize=normalize, assignment=mode)
    re = R.assignment_entropy(s, mode)
    # When a region feature r~ nearly cancels (e.g. D=1 with normalize: e = +-1), r = r~/||r~|| is
    # ill-conditioned and any two summation orders differ by ~1e-16/||r~|| relative; the tolerance
    # grows with that condition number instead of the case being left out.
    _, rnorm, _ = torch.ops.ld_ext.region_features(z.detach(), s.detach(), normalize, ld_ext.ops.ASSIGNMENT_MODES[mode], False)
    cond = max(1.0, 1e-4 / max(rnorm.min().item(), 1e-300))
    assert_close_rel(feats, rf, rtol=1e-10 * cond, atol=1e-13)
    assert_close_rel(ent, re, rtol=1e-10, atol=1e-13)
    w = torch.randn_like(rf)
    g = torch.autograd.grad(_weighted_sum(feats, ent, w), (z, s))
    rg = torch.autograd.grad(_weighted_sum(rf, re, w), (z, s))
    # (errors measured against the larger of the two gradients: a gradient that is zero in exact
    # arithmetic, such as ds with K=1, holds only rounding noise of the other's size)
    gscale = max(t.abs().max().item() for t in rg)
    for a, b in zip(g, rg):
        assert_close_rel(a, b, rtol=1e-9 * cond, atol=1e-12 + 1e-9 * cond * gscale)


def test_large_p_spans_many_chunks():
    # 300x300 = 90000 pixels: several reduction chunks and a ragged last tile.
    z, s = rand_inputs(2, 8, 5, (300, 300), assignment="sigmoid", seed=3)
    feats, ent = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="sigmoid")
    assert_close_rel(feats, R.region_features_bmm(z, s, normalize=True, assignment="sigmoid"), rtol=1e-10)
    assert_close_rel(ent, R.assignment_entropy(s, "sigmoid"), rtol=1e-10)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_non_contiguous_inputs(layout):
    z, s = rand_inputs(2, 6, 4, (9, 10), assignment="softmax", seed=5)
    if layout == "transposed":
        zi, si = z.transpose(2, 3).contiguous().transpose(2, 3), s.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channels_last":
        zi, si = z.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
    else:
        zi = torch.cat([z, z], dim=1)[:, ::2]
        si = torch.cat([s, s], dim=3)[..., ::2]
        z, s = zi.contiguous(), si.contiguous()
    assert not zi.is_contiguous() and not si.is_contiguous()
    zi.requires_grad_(True)
    si.requires_grad_(True)
    f, e = ld_ext.region_features_and_entropy(zi, si, normalize=True, assignment="softmax")
    fc, ec = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="softmax")
    assert torch.equal(f, fc) and torch.equal(e, ec)
    gz, gs = torch.autograd.grad(f.sum() + e, (zi, si))
    assert gz.shape == zi.shape and gs.shape == si.shape
    rz, rs = z.clone().requires_grad_(True), s.clone().requires_grad_(True)
    rf = R.region_features_bmm(rz, rs, normalize=True, assignment="softmax")
    rgz, rgs = torch.autograd.grad(rf.sum() + R.assignment_entropy(rs, "softmax"), (rz, rs))
    assert_close_rel(gz, rgz, rtol=1e-10)
    assert_close_rel(gs, rgs, rtol=1e-10)


def test_deterministic_bitwise():
    z, s = rand_inputs(3, 16, 8, (70, 130), dtype=torch.float32, assignment="sigmoid")
    z.requires_grad_(True)
    s.requires_grad_(True)
    outs = []
    for _ in range(2):
        f, e = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="sigmoid")
        g = torch.autograd.grad((f * f.detach()).sum() + e, (z, s))
        outs.append((f, e, *g))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_thread_count_does_not_change_result():
    z, s = rand_inputs(2, 8, 4, (100, 100), dtype=torch.float32, assignment="softmax")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="softmax")
        torch.set_num_threads(max(2, before))
        many = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="softmax")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_low_precision_inputs_computed_in_float32_on_cpu():
    z, s = rand_inputs(2, 4, 3, (6, 6), dtype=torch.float32, assignment="sigmoid")
    for dt in (torch.bfloat16, torch.float16):
        zl, sl = z.to(dt).requires_grad_(True), s.to(dt).requires_grad_(True)
        f, e = ld_ext.region_features_and_entropy(zl, sl, normalize=True, assignment="sigmoid")
        assert f.dtype == torch.float32 and e.dtype == torch.float32
        ref = R.region_features_bmm(zl.detach().float(), sl.detach().float(), normalize=True, assignment="sigmoid")
        assert_close_rel(f, ref, rtol=1e-5)
        gz, gs = torch.autograd.grad(f.sum() + e, (zl, sl))
        assert gz.dtype == dt and gs.dtype == dt


def test_nan_in_gives_nan_out():
    z, s = rand_inputs(2, 4, 3, (5, 5), assignment="sigmoid")
    z[0, 1, 2, 2] = float("nan")
    f, _ = ld_ext.region_features_and_entropy(z, s, normalize=True, assignment="sigmoid")
    assert torch.isnan(f[0]).any()
    assert not torch.isnan(f[1]).any()
    z2, s2 = rand_inputs(2, 4, 3, (5, 5), dtype=torch.float32, assignment="sigmoid")
    s2[1, 0, 0, 0] = float("nan")
    f2, e2 = ld_ext.region_features_and_entropy(z2, s2, normalize=False, assignment="sigmoid")
    assert torch.isnan(f2[1]).any() and torch.isnan(e2)


def test_zero_embedding_pixel_has_finite_gradient():
    z, s = rand_inputs(1, 4, 3, (4, 4), assignment="softmax")
    z[0, :, 1, 1] = 0.0
    z.requires_grad_(True)
    s.requires_grad_(True)
    f = ld_ext.region_features(z, s, normalize=True, assignment="softmax")
    gz, _ = torch.autograd.grad(f.sum(), (z, s))
    rz = z.detach().clone().requires_grad_(True)
    rf = R.region_features_bmm(rz, s.detach(), normalize=True, assignment="softmax")
    (rgz,) = torch.autograd.grad(rf.sum(), (rz,))
    assert torch.isfinite(gz).all()
    assert_close_rel(gz, rgz, rtol=1e-10)


def test_opcheck():
    for mode in range(3):
        z, s = rand_inputs(2, 3, 4, (5, 6), assignment=list(ld_ext.ops.ASSIGNMENT_MODES)[mode])
        z.requires_grad_(True)
        s.requires_grad_(True)
        torch.library.opcheck(torch.ops.ld_ext.region_features.default, (z, s, True, mode, True))
        torch.library.opcheck(torch.ops.ld_ext.region_features.default, (z.detach().float(), s.detach().float(), False, mode, False))
    z, s = rand_inputs(2, 3, 4, (5, 6))
    f, rn, _ = torch.ops.ld_ext.region_features(z, s, True, 1, True)
    torch.library.opcheck(
        torch.ops.ld_ext.region_features_backward.default,
        (torch.randn_like(f), torch.tensor(0.5, dtype=torch.float64), z, s, f, rn, True, 1, True),
    )


def test_cpu_autocast_mixed_dtypes():
    # Under autocast a bfloat16 conv output may meet a float32 tensor: the Autocast kernel brings
    # both to float32 on the CPU (one place, csrc/autocast.cpp) instead of refusing them.
    z, s = rand_inputs(2, 4, 3, (6, 6), dtype=torch.float32, assignment="sigmoid")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, e = ld_ext.region_features_and_entropy(z.bfloat16(), s, normalize=True, assignment="sigmoid")
    assert f.dtype == torch.float32
    ref = R.region_features_bmm(z.bfloat16().float(), s, normalize=True, assignment="sigmoid")
    assert_close_rel(f, ref, rtol=1e-5)
    with pytest.raises(TypeError, match="same dtype"):
        ld_ext.region_features(z.bfloat16(), s)  # outside autocast mixed dtypes are an error


def test_normalize_does_not_overflow_for_large_embeddings():
    """||z||^2 of a pixel overflowed for |z| >= 1.8e19 in float32 (1e154 in float64)."""
    g = torch.Generator().manual_seed(0)
    for dtype, scale in ((torch.float32, 1e22), (torch.float64, 1e170)):
        z = (torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64) * scale).to(dtype)
        s = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64).to(dtype)
        # PyTorch's own norm overflows in float64 here: the reference gets z times an exact power
        # of two c (normalising is scale-invariant up to the 1e-10): f(z) = f(c z), grad = c grad(c z).
        c = 2.0**-500 if dtype == torch.float64 else 1.0
        zr = (z.double() * c).requires_grad_(True)
        ref = R.region_features(zr, s.double(), normalize=True, assignment="softmax")
        zz = z.clone().requires_grad_(True)
        out = ld_ext.region_features(zz, s, normalize=True, assignment="softmax")
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        (gr,) = torch.autograd.grad((ref * w).sum(), zr)
        (gz,) = torch.autograd.grad((out * w.to(dtype)).sum(), zz)
        assert_close_rel(gz, gr * c, rtol=10 * tol)
