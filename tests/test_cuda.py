"""CUDA kernels of every fused op against the float64 reference (ld_ext.reference).

Skipped as a whole when no CUDA device is present (the kernels are then only compile-checked, by
.ci/cuda_compile.sh). On a GPU machine the extension must have been built with CUDA.
LD_EXT_CUDA_TEST_DEVICE=cpu runs the same tests against the CPU kernels: that checks the tests'
own logic (and the CPU ops by the same rules) on machines without a GPU; CI does it.

Rules, after Liger-Kernel / cut-cross-entropy:
* inputs are fresh random numbers on every run (never zeros); the seed is in every message;
* the reference is the same math in float64 on the same (dtype-rounded) inputs;
* a fused result passes when its relative error is <= the error of plain PyTorch in the same dtype
  plus a small per-dtype tolerance (float16/bfloat16: the fused ops accumulate in float32);
* outputs are "poisoned" before each call: the caching allocator is filled with NaN, so an
  element the kernel forgets to write shows up as NaN;
* determinism: two runs give bitwise the same outputs and gradients.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import ld_ext
from ld_ext import reference as R
from ld_ext.normalization import ASSIGNMENT_MODES
from ld_ext.ops import registry

DEV = os.environ.get("LD_EXT_CUDA_TEST_DEVICE", "cuda")
if DEV not in ("cuda", "cpu"):
    raise ValueError(f"LD_EXT_CUDA_TEST_DEVICE must be 'cuda' or 'cpu', got {DEV!r}")
CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not CUDA,
                       reason="no CUDA device on this machine: CUDA kernels are only compile-checked here"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)
# Added to the plain-PyTorch error of the same dtype (relative Frobenius error against float64).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
MODES = list(ASSIGNMENT_MODES)
# (N, D, K, spatial): odd sizes on purpose, 1-3 spatial dims, a tile boundary (128 pixels) crossed;
# the last has K x D too large for the register-blocked kernels, so the general kernels run.
RF_SHAPES = [(1, 2, 2, (1, 1)), (3, 5, 7, (13, 17)), (2, 32, 16, (40, 33)), (2, 3, 4, (129,)), (2, 6, 3, (5, 7, 9)),
             (2, 130, 40, (9, 11))]


def _dname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@pytest.fixture(scope="module", autouse=True)
def _built_with_cuda():
    if DEV == "cuda" and CUDA and not ld_ext.build_info()["cuda_compiled"]:
        pytest.fail("a CUDA device is present but ld_ext._C was built without CUDA: rebuild with nvcc on PATH")


@pytest.fixture()
def seed():
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def plain_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    e = rel(x, ref)
    return e if e == e else float("inf")


def leaf64(x: torch.Tensor) -> torch.Tensor:
    """A float64 leaf copy of x. (x.double() would alias a float64 x, so the reference's backward
    would also accumulate into x, and every later copy of x would require grad.)"""
    return x.detach().to(torch.float64, copy=True).requires_grad_()


def check(fused, plain, ref, dtype, what, seed, slack=0.0):
    """The fused error against the float64 reference may be as large as plain PyTorch's at the same
    precision plus ``TOL``; for gradients twice plain PyTorch's (the rule of the CUDA emulator's
    gradient checks): a gradient takes more rounding steps, and in small cases with cancellation
    (CI drew seed 159163009: one pixel, two softmax clusters, float32) two correct float32 orders of
    operations differ by about that much (fused 4.2e-5, plain 2.0e-5, TOL 2e-5)."""
    for name, t in (("fused", fused), ("plain", plain), ("reference", ref)):
        assert t is not None, f"{what} [{_dname(dtype)}, seed {seed}]: the {name} result is missing (no gradient?)"
    ef = rel(fused, ref)
    ep = plain_rel(plain, ref)
    tol = TOL[dtype] + slack
    factor = 2.0 if what.startswith("grad") else 1.0
    assert ef <= factor * ep + tol, (
        f"{what} [{_dname(dtype)}, seed {seed}]: fused rel err {ef:.3e} > {factor:g} x plain {ep:.3e} + {tol:.1e}"
    )


def poison():
    """Fill the caching allocator's free blocks (small and large pools) with NaN."""
    if DEV != "cuda":
        return
    big = torch.full((16 << 20,), float("nan"), device=DEV)
    small = [torch.full((1 << 16,), float("nan"), device=DEV) for _ in range(64)]
    del big, small


def assignments_for(mode, shape, dtype):
    s = torch.randn(shape, dtype=torch.float64) * 2.0
    if mode == "probs":
        s = torch.softmax(s, dim=1)
    return s.to(dtype)


def rf_inputs(n, d, k, spatial, dtype, mode):
    e = (torch.randn((n, d, *spatial), dtype=torch.float64) + 0.3).to(dtype).to(DEV)
    a = assignments_for(mode, (n, k, *spatial), dtype).to(DEV)
    return e, a


def rf_loss_fused(e, a, normalize, mode, w, c):
    poison()
    feats, ent = ld_ext.region_features_and_entropy(e, a, normalize=normalize, assignment=mode)
    return feats, ent, (feats * w).sum() + ent * c


def rf_loss_ref(e, a, normalize, mode, w, c):
    feats = R.region_features_bmm(e, a, normalize=normalize, assignment=mode)
    ent = R.assignment_entropy(a, mode)
    return feats, ent, (feats.to(w.dtype) * w).sum() + ent.to(w.dtype) * c


# ----------------------------------------------------------------------------- region features


@pytest.mark.parametrize("shape", RF_SHAPES, ids=lambda s: "x".join(map(str, (s[0], s[1], s[2], *s[3]))))
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_region_features_forward_backward(dtype, mode, normalize, shape, seed):
    n, d, k, spatial = shape
    e, a = rf_inputs(n, d, k, spatial, dtype, mode)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn((n, k, d), dtype=out_dtype, device=DEV)
    c = float(torch.randn(()).item())

    ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
    feats, ent, loss = rf_loss_fused(ef, af, normalize, mode, w, c)
    assert feats.dtype == out_dtype and ent.dtype == out_dtype and feats.shape == (n, k, d)
    loss.backward()
    assert ef.grad.dtype == dtype and af.grad.dtype == dtype and ef.grad.is_contiguous()

    er, ar = leaf64(e), leaf64(a)
    feats_r, ent_r, loss_r = rf_loss_ref(er, ar, normalize, mode, w.double(), c)
    loss_r.backward()

    ep, ap = e.clone().requires_grad_(), a.clone().requires_grad_()
    feats_p, ent_p, loss_p = rf_loss_ref(ep, ap, normalize, mode, w, c)
    loss_p.backward()

    check(feats, feats_p, feats_r, dtype, "feats", seed)
    check(ent, ent_p, ent_r, dtype, "entropy", seed)
    check(ef.grad, ep.grad, er.grad, dtype, "grad embeddings", seed)
    check(af.grad, ap.grad, ar.grad, dtype, "grad assignments", seed)

    # region_features without entropy: same features, no entropy gradient.
    poison()
    f2 = ld_ext.region_features(e, a, normalize=normalize, assignment=mode)
    assert torch.equal(f2, feats.detach())


def test_region_features_large_p(seed):
    """P = 1024 * 1024 pixels: many tiles per image, long per-block sums."""
    n, d, k = 2, 16, 8
    e, a = rf_inputs(n, d, k, (1024, 1024), torch.float32, "sigmoid")
    w = torch.randn((n, k, d), device=DEV)
    ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
    feats, ent, loss = rf_loss_fused(ef, af, True, "sigmoid", w, 0.7)
    loss.backward()
    er, ar = leaf64(e), leaf64(a)
    feats_r, ent_r, loss_r = rf_loss_ref(er, ar, True, "sigmoid", w.double(), 0.7)
    loss_r.backward()
    ep, ap = e.clone().requires_grad_(), a.clone().requires_grad_()
    feats_p, ent_p, loss_p = rf_loss_ref(ep, ap, True, "sigmoid", w, 0.7)
    loss_p.backward()
    check(feats, feats_p, feats_r, torch.float32, "feats (large P)", seed)
    check(ent, ent_p, ent_r, torch.float32, "entropy (large P)", seed)
    check(ef.grad, ep.grad, er.grad, torch.float32, "grad embeddings (large P)", seed)
    check(af.grad, ap.grad, ar.grad, torch.float32, "grad assignments (large P)", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_loss_module_end_to_end(dtype, seed):
    """RegionDiscriminationLoss(normalize, sigmoid, entropy): loss in fp32 for low precision, grads."""
    e, a = rf_inputs(3, 8, 5, (31, 29), dtype, "sigmoid")
    mod = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)
    ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
    poison()
    l_rd, l_ent = mod(ef, af)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert l_rd.dtype == out_dtype and l_ent.dtype == out_dtype
    (10 * l_rd + 0.1 * l_ent).backward()

    def ref(ee, aa):
        lr, le = R.region_discrimination_loss(ee, aa, normalize=True, assignment="sigmoid", return_entropy=True)
        return lr, le

    er, ar = leaf64(e), leaf64(a)
    lr_r, le_r = ref(er, ar)
    (10 * lr_r + 0.1 * le_r).backward()
    ep, ap = e.clone().requires_grad_(), a.clone().requires_grad_()
    lr_p, le_p = ref(ep, ap)
    (10 * lr_p.float() + 0.1 * le_p.float()).backward()
    check(l_rd, lr_p, lr_r, dtype, "loss_rd", seed)
    check(l_ent, le_p, le_r, dtype, "loss_ent", seed)
    check(ef.grad, ep.grad, er.grad, dtype, "grad embeddings", seed)
    check(af.grad, ap.grad, ar.grad, dtype, "grad assignments", seed)


# ----------------------------------------------------------------------------- region discrimination


@pytest.mark.parametrize("nkd", [(1, 1, 1), (2, 3, 5), (7, 16, 32), (5, 33, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_region_discrimination(dtype, nkd, seed):
    n, k, d = nkd
    r = torch.randn((n, k, d), dtype=torch.float64)
    r = (r / r.norm(dim=-1, keepdim=True)).to(dtype).to(DEV)
    tau = random.choice([0.2, 0.07, 1.0])
    g = float(torch.rand(()).item()) + 0.5
    rf = r.clone().requires_grad_()
    poison()
    loss = ld_ext.region_discrimination(rf, tau)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    (loss * g).backward()
    assert rf.grad.dtype == dtype
    rr = leaf64(r)
    loss_r = R.region_discrimination(rr, tau)
    (loss_r * g).backward()
    rp = r.clone().requires_grad_()
    loss_p = R.region_discrimination(rp, tau)
    (loss_p * g).backward()
    # Each row term is logsumexp - logit with logits up to 1/tau: its rounding is about eps/tau
    # absolute, eps/(tau * loss) relative for a small, well-separated loss, whichever float
    # formulation computes it (seen in the CUDA emulation: 7.9e-5 against plain 1.2e-5).
    cond = 1.0 / (tau * max(abs(loss_r.item()), 1e-30))
    check(loss, loss_p, loss_r, dtype, "loss", seed, 8 * torch.finfo(loss.dtype).eps * cond)
    check(rf.grad, rp.grad, rr.grad, dtype, "grad feats", seed)


# ----------------------------------------------------------------------------- pixel cluster similarity


@pytest.mark.parametrize("shape", [(1, 2, 2, (1,)), (3, 5, 7, (13, 17)), (2, 32, 16, (64, 65)), (2, 4, 3, (5, 6, 7)),
                                   (2, 130, 40, (9, 11))],
                         ids=lambda s: "x".join(map(str, (s[0], s[1], s[2], *s[3]))))
@pytest.mark.parametrize("per_image", [False, True], ids=["shared", "per_image"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_pixel_cluster_similarity(dtype, normalize, per_image, shape, seed):
    n, d, k, spatial = shape
    e = torch.randn((n, d, *spatial), dtype=torch.float64).to(dtype).to(DEV)
    pshape = (n, k, d) if per_image else (k, d)
    p = torch.randn(pshape, dtype=torch.float64)
    p = (p / p.norm(dim=-1, keepdim=True)).to(dtype).to(DEV)
    tau = random.choice([0.2, 0.5])
    gout = torch.randn((n, k, *spatial), dtype=torch.float64).to(dtype).to(DEV)

    ef, pf = e.clone().requires_grad_(), p.clone().requires_grad_()
    poison()
    out = ld_ext.pixel_cluster_similarity(ef, pf, tau, normalize=normalize)
    assert out.dtype == dtype and out.shape == (n, k, *spatial)
    (out * gout).sum().backward()
    assert ef.grad.dtype == dtype and pf.grad.dtype == dtype

    er, pr = leaf64(e), leaf64(p)
    out_r = R.pixel_cluster_similarity(er, pr, tau, normalize=normalize)
    (out_r * gout.double()).sum().backward()
    ep, pp = e.clone().requires_grad_(), p.clone().requires_grad_()
    out_p = R.pixel_cluster_similarity(ep, pp, tau, normalize=normalize)
    (out_p * gout).sum().backward()
    check(out, out_p, out_r, dtype, "similarity", seed)
    # The gradients' condition (softmax-backward and prototype cancellation): the float64 reference
    # rounds there as much as the kernels, in another order.
    cond_e, cond_p = R.pixel_cluster_similarity_grad_condition(e, p, gout, tau, normalize=normalize)
    eps = torch.finfo(torch.float32 if dtype in LOW else dtype).eps
    check(ef.grad, ep.grad, er.grad, dtype, "grad embeddings", seed, 8 * eps * cond_e)
    check(pf.grad, pp.grad, pr.grad, dtype, "grad prototypes", seed, 8 * eps * cond_p)


# ----------------------------------------------------------------------------- patch discrimination


@pytest.mark.parametrize("md", [(2, 1), (2, 7), (6, 3), (130, 32), (1024, 32), (258, 300)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_patch_discrimination(dtype, md, seed):
    m, d = md
    x = torch.randn((m, d), dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True)).to(dtype).to(DEV)
    tau = random.choice([0.1, 0.3])
    g = float(torch.rand(()).item()) + 0.5
    xf = x.clone().requires_grad_()
    poison()
    loss = ld_ext.patch_discrimination(xf, tau)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    (loss * g).backward()
    assert xf.grad.dtype == dtype
    xr = leaf64(x)
    (R.patch_discrimination(xr, tau) * g).backward()
    loss_r = R.patch_discrimination(x.double(), tau)
    xp = x.clone().requires_grad_()
    loss_p = R.patch_discrimination(xp, tau)
    (loss_p * g).backward()
    # The gradient holds p/(1-p) terms that cancel when one other row takes almost all of a row's
    # mass (D=1 rows are exactly +-1); two exact-math-equivalent formulations then differ by rounding
    # times that odds ratio (as in tests/test_patch_discrimination.py), which a plain float64
    # evaluation of the reference's own formula does not show.
    p = torch.softmax((x.double() @ x.double().t() / tau).fill_diagonal_(float("-inf")), dim=1)
    cond = max(1.0, (p / (1 - p).clamp_min(1e-300)).max().item())
    slack = 16 * torch.finfo(torch.float32 if dtype in LOW else dtype).eps * cond
    check(loss, loss_p, loss_r, dtype, "loss", seed, slack)
    check(xf.grad, xp.grad, xr.grad, dtype, "grad x", seed, slack)
    loss_m = ld_ext.PatchDiscriminationLoss(tau)(x)
    assert torch.equal(loss_m, loss.detach())


# ----------------------------------------------------------------------------- determinism, CPU agreement


def _all_ops_outputs(dtype, seed_inputs):
    """Run every op forward and backward once; return all outputs and gradients."""
    e, a, p, x, r = seed_inputs
    outs = []
    ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
    l_rd, l_ent = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)(ef, af)
    (l_rd + 0.1 * l_ent).backward()
    outs += [l_rd, l_ent, ef.grad, af.grad]
    for mode in ("probs", "softmax"):
        ef2, af2 = e.clone().requires_grad_(), a.softmax(1).clone().requires_grad_()
        f, h = ld_ext.region_features_and_entropy(ef2, af2, normalize=False, assignment=mode)
        # Region features are unit rows, so sum(f**2) would be constant and its gradient rounding
        # noise (that made the CPU-vs-CUDA comparison fail on an H200): weight f by fixed numbers.
        w = torch.cos(torch.arange(f.numel(), dtype=torch.float64)).view(f.shape).to(f)
        ((f * w).sum() + h).backward()
        outs += [f, h, ef2.grad, af2.grad]
    ef3, pf = e.clone().requires_grad_(), p.clone().requires_grad_()
    s = ld_ext.pixel_cluster_similarity(ef3, pf, 0.2, normalize=True)
    (s * s).sum().backward()
    outs += [s, ef3.grad, pf.grad]
    xf = x.clone().requires_grad_()
    lp = ld_ext.patch_discrimination(xf, 0.1)
    lp.backward()
    outs += [lp, xf.grad]
    rf = r.clone().requires_grad_()
    lr = ld_ext.region_discrimination(rf, 0.2)
    lr.backward()
    outs += [lr, rf.grad]
    return [o.detach() for o in outs]


def _det_inputs(dtype, device=DEV, hw=(96, 97)):
    e = torch.randn((4, 32, *hw), dtype=torch.float64).to(dtype).to(device)
    a = torch.randn((4, 16, *hw), dtype=torch.float64).to(dtype).to(device)
    p = torch.nn.functional.normalize(torch.randn((16, 32), dtype=torch.float64), dim=1).to(dtype).to(device)
    x = torch.nn.functional.normalize(torch.randn((256, 32), dtype=torch.float64), dim=1).to(dtype).to(device)
    r = torch.nn.functional.normalize(torch.randn((4, 16, 32), dtype=torch.float64), dim=2).to(dtype).to(device)
    return e, a, p, x, r


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_deterministic(dtype, seed):
    inputs = _det_inputs(dtype)
    poison()
    first = _all_ops_outputs(dtype, inputs)
    poison()
    second = _all_ops_outputs(dtype, inputs)
    for i, (u, v) in enumerate(zip(first, second)):
        assert torch.isfinite(u.double()).all(), f"output {i} not finite [{_dname(dtype)}, seed {seed}]"
        assert torch.equal(u, v), f"output {i} differs between two runs [{_dname(dtype)}, seed {seed}]"


@pytest.mark.skipif(DEV != "cuda", reason="compares the CUDA kernels with the CPU kernels or with each other")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dname)
def test_cpu_and_cuda_agree(dtype, seed):
    inputs = _det_inputs(dtype, device="cpu", hw=(33, 35))
    cpu = _all_ops_outputs(dtype, inputs)
    gpu = _all_ops_outputs(dtype, [t.to(DEV) for t in inputs])
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for i, (u, v) in enumerate(zip(cpu, gpu)):
        err = rel(v, u)
        assert err <= tol, f"output {i}: CPU vs CUDA rel err {err:.3e} [{_dname(dtype)}, seed {seed}]"


# ----------------------------------------------------------------------------- layouts, NaN, autocast, gradcheck


def test_strided_and_channels_last_inputs(seed):
    e, a = rf_inputs(2, 8, 5, (20, 24), torch.float32, "sigmoid")
    base = ld_ext.region_features(e, a, normalize=True, assignment="sigmoid")
    cl = ld_ext.region_features(e.to(memory_format=torch.channels_last), a.to(memory_format=torch.channels_last),
                                normalize=True, assignment="sigmoid")
    assert rel(cl, base) <= 1e-6
    big_e = torch.randn((2, 8, 20, 48), device=DEV)
    big_e[..., ::2] = e
    strided = ld_ext.region_features(big_e[..., ::2], a, normalize=True, assignment="sigmoid")
    assert rel(strided, base) <= 1e-6
    p = torch.nn.functional.normalize(torch.randn(5, 8, device=DEV), dim=1)
    s1 = ld_ext.pixel_cluster_similarity(e, p)
    s2 = ld_ext.pixel_cluster_similarity(e.to(memory_format=torch.channels_last), p.t().contiguous().t())
    assert rel(s2, s1) <= 1e-6


def test_nan_in_gives_nan_out():
    e, a = rf_inputs(2, 4, 3, (9, 9), torch.float32, "sigmoid")
    e[1, 2, 3, 4] = float("nan")
    feats = ld_ext.region_features(e, a, normalize=True, assignment="sigmoid")
    assert torch.isnan(feats[1]).all() and torch.isfinite(feats[0]).all()
    x = torch.nn.functional.normalize(torch.randn(8, 4, device=DEV), dim=1)
    x[3, 1] = float("nan")
    assert torch.isnan(ld_ext.patch_discrimination(x, 0.1))
    r = torch.randn(3, 4, 5, device=DEV)
    r[0, 0, 0] = float("nan")
    assert torch.isnan(ld_ext.region_discrimination(r, 0.2))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=_dname)
def test_autocast(low, seed):
    e, a = rf_inputs(2, 8, 4, (16, 16), torch.float32, "sigmoid")
    ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
    with torch.autocast(DEV, dtype=low):
        emb = torch.nn.functional.conv2d(ef, torch.eye(8, device=DEV)[:, :, None, None])  # low precision
        l_rd, l_ent = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)(emb, af.to(emb.dtype))
    assert emb.dtype == low and l_rd.dtype == torch.float32 and l_ent.dtype == torch.float32
    (l_rd + l_ent).backward()
    assert ef.grad.dtype == torch.float32 and torch.isfinite(ef.grad).all() and torch.isfinite(af.grad).all()
    lr, le = R.region_discrimination_loss(e.double(), a.double(), normalize=True, assignment="sigmoid", return_entropy=True)
    assert abs(l_rd.item() - lr.item()) <= 5e-2 * max(1.0, abs(lr.item()))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    e, a = rf_inputs(2, 3, 4, (5, 6), torch.float64, mode)
    if mode == "probs":
        # Finite differences (eps 1e-6) of the entropy's log2(a) need a >> eps: a softmax draw can
        # hold probabilities near 1e-7 (seen once in CI); keep them >= 0.025, still a distribution.
        a = 0.9 * a + 0.1 / a.shape[1]
    e.requires_grad_()
    a.requires_grad_()

    def f(ee, aa):
        feats, ent = ld_ext.region_features_and_entropy(ee, aa, normalize=True, assignment=mode)
        return ld_ext.region_discrimination(feats, 0.2), ent

    assert torch.autograd.gradcheck(f, (e, a), eps=1e-6, atol=1e-6, rtol=1e-4)
    p = torch.randn(4, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ee, pp: ld_ext.pixel_cluster_similarity(ee, pp, 0.3, normalize=True), (e, p))
    # patch_discrimination has stop-gradients (only the first argument of each inner product gets a
    # gradient), so finite differences do not apply; it is checked against the reference instead.


def _opcheck_args(op):
    """Arguments for torch.library.opcheck of op ``op``, for every op of the registry."""
    if op == "region_features":
        e, a = rf_inputs(2, 3, 4, (5, 6), torch.float32, "sigmoid")
        return e.requires_grad_(), a.requires_grad_(), True, 1, True
    if op == "region_discrimination":
        return torch.nn.functional.normalize(torch.randn(3, 4, 5, device=DEV), dim=2).requires_grad_(), 0.2
    if op == "pixel_cluster_similarity":
        e, _ = rf_inputs(2, 3, 4, (5, 6), torch.float32, "sigmoid")
        return e.requires_grad_(), torch.randn(4, 3, device=DEV, requires_grad=True), 0.2, True
    if op == "patch_discrimination":
        return torch.nn.functional.normalize(torch.randn(6, 3, device=DEV), dim=1).requires_grad_(), 0.1
    raise KeyError(f"no opcheck arguments for {op} written here: add them")


@pytest.mark.parametrize("op", registry.NAMES)
def test_opcheck(op):
    """Schema, fake kernel and autograd registration agree with the CUDA kernels."""
    torch.library.opcheck(getattr(torch.ops.ld_ext, op).default, _opcheck_args(op))


@pytest.mark.skipif(DEV != "cuda", reason="compares the CUDA kernels with the CPU kernels or with each other")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dname)
def test_register_blocked_and_general_kernels_agree(dtype, seed, monkeypatch):
    """The register-blocked kernels (default where K x D allows) and the general kernels
    (LD_EXT_CUDA_RB_*_CP=0) compute the same values and gradients, also at several chunk sizes."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    e, a = rf_inputs(2, 32, 16, (45, 37), dtype, "sigmoid")
    p = torch.nn.functional.normalize(torch.randn(2, 16, 32, dtype=torch.float64), dim=2).to(dtype).to(DEV)
    gout = torch.randn((2, 16, 45, 37), dtype=torch.float64).to(dtype).to(DEV)

    def run_all():
        ef, af = e.clone().requires_grad_(), a.clone().requires_grad_()
        l_rd, l_ent = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)(ef, af)
        (10 * l_rd + 0.1 * l_ent).backward()
        ep, pp = e.clone().requires_grad_(), p.clone().requires_grad_()
        out = ld_ext.pixel_cluster_similarity(ep, pp, 0.2, normalize=True)
        (out * gout).sum().backward()
        return [l_rd, l_ent, ef.grad, af.grad, out, ep.grad, pp.grad]

    monkeypatch.setenv("LD_EXT_CUDA_RB_FWD_CP", "0")
    monkeypatch.setenv("LD_EXT_CUDA_RB_BWD_CP", "0")
    general = run_all()
    # (forward chunk, backward chunk, reads one chunk ahead: LD_EXT_CUDA_RB_PREFETCH)
    for fwd_cp, bwd_cp, prefetch in (("128", "64", "1"), ("128", "64", "0"), ("32", "16", "1"), ("4", "128", "0")):
        monkeypatch.setenv("LD_EXT_CUDA_RB_FWD_CP", fwd_cp)
        monkeypatch.setenv("LD_EXT_CUDA_RB_BWD_CP", bwd_cp)
        monkeypatch.setenv("LD_EXT_CUDA_RB_PREFETCH", prefetch)
        poison()
        fast = run_all()
        for i, (u, v) in enumerate(zip(fast, general)):
            err = rel(u, v)
            assert err <= tol, (f"output {i}: chunks {fwd_cp}/{bwd_cp} prefetch {prefetch} vs general kernels "
                                f"rel err {err:.3e} [{_dname(dtype)}, seed {seed}]")
