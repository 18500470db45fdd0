"""Run ld_ext's CUDA kernels on the CPU (emu.h) against the float64 reference.

    python tools/cuda_emu/run_emulated.py [--build-dir DIR] [--seed S] [--only rf|rd|pcs|pd|norm ...]

(--only takes the ops' short names of ld_ext/ops/registry.py, and norm.)

Builds a CPU library from the CUDA sources as they are, with torch.utils.cpp_extension (C++20, no
nvcc): csrc/ops.cpp (the schemas, namespace ld_ext), csrc/cpu/isa.cpp, and every csrc/cuda/*.cu
compiled as C++ through a generated one-line wrapper that includes emu.h first (emu.h defines the
LD_CUDA_* macros of csrc/cuda/common.cuh its own way; nothing is rewritten). The CUDA kernels then
serve the ld_ext ops for CPU tensors. Before building, the CUDA sources are checked for CUDA
constructs written outside those macros (a raw `<<<...>>>` launch, `extern __shared__`, `is_cuda()`,
a registration for the CUDA key), which the emulator could not replace: any is an error that
names the file and line. Then every forward and backward op is called on fresh random inputs and
compared with ld_ext.reference in float64 (float32 and bfloat16 inputs with fp32-level tolerances,
float64 tightly); two runs must be bitwise equal; tiles that hold several chunks per block and the
shared-memory opt-in path are covered. Prints "N passed, M failed" last and exits non-zero on any
failure. Needs only torch (any build) and a C++20 compiler. Never import the ld_ext package in the
same process (its own ld_ext._C would define the same operators again).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import math
import os
import random
import re
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")


def _ld_ext_module(name: str):
    """ld_ext/<name>.py as a module of a stand-in package over ld_ext/ (its relative imports work),
    without running ld_ext/__init__.py, which would load ld_ext._C. Not for ld_ext.ops, whose
    __init__ loads ld_ext._C too."""
    pkg = types.ModuleType("_ld_ext_sources")
    pkg.__path__ = [os.path.join(ROOT, "ld_ext")]
    sys.modules.setdefault("_ld_ext_sources", pkg)
    return importlib.import_module(f"_ld_ext_sources.{name}")


def _reference():
    return _ld_ext_module("reference")


def _registry():
    """ld_ext/ops/registry.py, the list of the ops, loaded by its path: plain Python (importing it
    as ld_ext.ops.registry would run ld_ext/ops/__init__.py, which loads ld_ext._C)."""
    spec = importlib.util.spec_from_file_location("_ld_ext_ops_registry", os.path.join(ROOT, "ld_ext", "ops", "registry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGISTRY = _registry()
ASSIGNMENT_MODES = _ld_ext_module("normalization").ASSIGNMENT_MODES  # mode name -> the operators' number
MODES = list(ASSIGNMENT_MODES)
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max  # the ops' smallest (csrc/checks.h)


# CUDA constructs the emulator cannot replace when written directly: each must go through its
# LD_CUDA_* macro or helper of csrc/cuda/common.cuh (whose #ifndef LD_EXT_CUDA_EMULATION block
# defines the macros and is exempt).
RAW_CUDA = [
    (re.compile(r"<<<"), "a kernel launch with <<<...>>>: use launch() of common.cuh"),
    (re.compile(r"\bextern\s+__shared__\b"), "extern __shared__: use LD_CUDA_DYNAMIC_SMEM(T, name)"),
    (re.compile(r"\.is_cuda\(\)"), "is_cuda(): use check_cuda_tensor() or LD_CUDA_IS_DEVICE_TENSOR"),
    (re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*ld_ext\s*,\s*CUDA\b"),
     "TORCH_LIBRARY_IMPL(ld_ext, CUDA, m): use TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m)"),
]
GUARD = "#ifndef LD_EXT_CUDA_EMULATION"


def check_sources(cuda_dir: str = os.path.join(CSRC, "cuda")) -> list[str]:
    """The CUDA sources' files; raises SystemExit naming file:line for each CUDA construct written
    outside the LD_CUDA_* macros, or when common.cuh lost the block that emu.h replaces."""
    paths = sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cuh")))
    if not any(p.endswith(".cu") for p in paths):
        raise SystemExit(f"run_emulated: no CUDA sources in {cuda_dir}")
    problems = []
    for path in paths:
        with open(path) as f:
            lines = f.read().split("\n")
        name = os.path.relpath(path, ROOT)
        if os.path.basename(path) == "common.cuh" and GUARD not in [ln.strip() for ln in lines]:
            problems.append(f"{name}: no '{GUARD}' block (emu.h relies on it to replace the CUDA headers and macros)")
        depth = 0  # inside the #ifndef LD_EXT_CUDA_EMULATION block (nesting of #if...#endif)
        for no, line in enumerate(lines, 1):
            code = line.split("//", 1)[0]
            stripped = code.strip()
            if depth:
                if stripped.startswith("#if"):
                    depth += 1
                elif stripped.startswith("#endif"):
                    depth -= 1
                continue
            if stripped == GUARD:
                depth = 1
                continue
            for pattern, why in RAW_CUDA:
                if pattern.search(code):
                    problems.append(f"{name}:{no}: {why}")
    if problems:
        raise SystemExit("run_emulated: CUDA source the emulator cannot run:\n  " + "\n  ".join(problems))
    return paths


def build(build_dir: str):
    """Compiles the CUDA sources for the emulator (see the module docstring); returns torch.ops.ld_ext."""
    from torch.utils.cpp_extension import load

    sources = check_sources()
    gen = os.path.join(build_dir, "gen")
    os.makedirs(gen, exist_ok=True)
    wrappers = []
    for path in sources:
        if not path.endswith(".cu"):
            continue
        wrapper = os.path.join(gen, "emu_" + os.path.basename(path)[:-3] + ".cpp")
        text = f'// Generated by tools/cuda_emu/run_emulated.py.\n#include "emu.h"\n#include "{path}"\n'
        old = open(wrapper).read() if os.path.exists(wrapper) else None
        if old != text:  # unchanged wrappers keep their timestamps (ninja rebuilds what changed)
            with open(wrapper, "w") as f:
                f.write(text)
        wrappers.append(wrapper)
    load(
        name="ld_ext_emu",
        sources=[os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "cpu", "isa.cpp")] + wrappers,
        extra_include_paths=[HERE],
        extra_cflags=["-O1", "-std=c++20", "-DEMU_SMS=4", "-w"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.ld_ext


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape or not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}
GTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1.5e-2}  # grads are rounded to the input dtype


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def __call__(self, name: str, ok: bool, detail: str = ""):
        if ok:
            self.passed += 1
        else:
            self.failed.append(f"{name} {detail}")
            print(f"FAILED {name} {detail}")


def check_region_features(ops, R, chk, dtype, shape, mode, normalize):
    n, d, k, sp = shape
    e = (torch.randn(n, d, *sp, dtype=torch.float64) + 0.3).to(dtype)
    a = torch.randn(n, k, *sp, dtype=torch.float64) * 2
    a = (a.softmax(1) if mode == "probs" else a).to(dtype)
    m = ASSIGNMENT_MODES[mode]
    feats, rnorm, ent = ops.region_features(e, a, normalize, m, True)
    again = ops.region_features(e, a, normalize, m, True)
    er, ar = e.detach().double().clone().requires_grad_(), a.detach().double().clone().requires_grad_()
    fr = R.region_features_bmm(er, ar, normalize=normalize, assignment=mode)
    hr = R.assignment_entropy(ar, mode)
    od = torch.float64 if dtype == torch.float64 else torch.float32
    w, c = torch.randn(n, k, d, dtype=od), torch.randn((), dtype=od)
    ((fr * w.double()).sum() + hr * c.double()).backward()
    ge, ga = ops.region_features_backward(w, c, e, a, feats, rnorm, normalize, m, True)
    ge2, ga2 = ops.region_features_backward(w, c, e, a, feats, rnorm, normalize, m, True)
    tag = f"region_features[{dtype} {shape} {mode} normalize={normalize}]"
    chk(tag + " feats", rel(feats, fr) <= TOL[dtype], f"{rel(feats, fr):.2e}")
    # Plain PyTorch at the kernels' accumulation precision on the same input values.
    ep, ap = e.to(od).clone().requires_grad_(), a.to(od).clone().requires_grad_()
    fp = R.region_features_bmm(ep, ap, normalize=normalize, assignment=mode)
    hp = R.assignment_entropy(ap, mode)
    # The entropy is a mean of binary entropies h(a); where a is near 1 (a peaked one-pixel softmax)
    # 1 - a already loses its relative precision in the input dtype, so any float32 implementation
    # misses the float64 value by more than tol: rule "error <= 2 x plain error + tol" (seed
    # 1327787327 drew a one-pixel case with error 5.4e-5 against tol 2e-5).
    ph = rel(hp, hr)
    chk(tag + " entropy", rel(ent, hr) <= 2 * ph + TOL[dtype], f"{rel(ent, hr):.2e} (plain {ph:.2e})")
    chk(tag + " rnorm", rnorm.shape == (n, k) and feats.dtype == od and ent.dtype == od)
    # Gradients: where they cancel (one pixel: a region feature does not depend on its assignment,
    # so grad_a is the entropy term plus rounding noise of the feature path) any implementation
    # rounds; the same rule (1 draw in 150 of the 1-pixel sigmoid case exceeded tol alone).
    ((fp * w).sum() + hp * c).backward()
    pe, pa = rel(ep.grad, er.grad), rel(ap.grad, ar.grad)
    chk(tag + " grad_e", ge.dtype == dtype and rel(ge, er.grad) <= 2 * pe + GTOL[dtype],
        f"{rel(ge, er.grad):.2e} (plain {pe:.2e})")
    chk(tag + " grad_a", ga.dtype == dtype and rel(ga, ar.grad) <= 2 * pa + GTOL[dtype],
        f"{rel(ga, ar.grad):.2e} (plain {pa:.2e})")
    same = all(torch.equal(u, v) for u, v in zip((feats, rnorm, ent, ge, ga), (*again, ge2, ga2)))
    chk(tag + " bitwise repeatable", same)
    f3, _, h3 = ops.region_features(e, a, normalize, m, False)
    chk(tag + " entropy=false", torch.equal(f3, feats) and h3.item() == 0.0)


def check_region_discrimination(ops, R, chk, dtype, nkd):
    r = torch.nn.functional.normalize(torch.randn(*nkd, dtype=torch.float64), dim=2).to(dtype)
    tau = random.choice([0.2, 0.07])
    loss = ops.region_discrimination(r, tau)
    rr = r.double().clone().requires_grad_()
    lr = R.region_discrimination(rr, tau)
    (lr * 1.3).backward()
    g = ops.region_discrimination_backward(torch.tensor(1.3, dtype=loss.dtype), r, tau)
    tag = f"region_discrimination[{dtype} {nkd}]"
    # Rule "error <= plain error + tol", plain = the reference in the op's accumulation precision on
    # the same inputs, plus the loss's own condition: each row term is logsumexp - logit with
    # logits up to 1/tau, so its rounding is about eps/tau absolute, eps/(tau * loss) relative for a
    # small, well-separated loss (a fixed tolerance failed about 1 run in 8: 7.9e-5 vs plain 1.2e-5).
    rp = r.to(loss.dtype).clone().requires_grad_()
    lp = R.region_discrimination(rp, tau)
    (lp * 1.3).backward()
    cond = 1.0 / (tau * max(abs(lr.item()), 1e-30))
    tl = TOL[dtype] + rel(lp, lr) + 8 * torch.finfo(loss.dtype).eps * cond
    tg = GTOL[dtype] + rel(rp.grad, rr.grad)
    chk(tag + " loss", rel(loss, lr) <= tl, f"{rel(loss, lr):.2e} (plain {rel(lp, lr):.2e})")
    chk(tag + " grad", g.dtype == dtype and rel(g, rr.grad) <= tg, f"{rel(g, rr.grad):.2e} (plain {rel(rp.grad, rr.grad):.2e})")


def check_pcs(ops, R, chk, dtype, shape, per_image, normalize):
    n, d, k, sp = shape
    e = torch.randn(n, d, *sp, dtype=torch.float64).to(dtype)
    p = torch.nn.functional.normalize(torch.randn(*((n, k, d) if per_image else (k, d)), dtype=torch.float64), dim=-1)
    p = p.to(dtype)
    out = ops.pixel_cluster_similarity(e, p, 0.3, normalize)
    er, pr = e.double().clone().requires_grad_(), p.double().clone().requires_grad_()
    outr = R.pixel_cluster_similarity(er, pr, 0.3, normalize=normalize)
    go = torch.randn_like(outr)
    (outr * go).sum().backward()
    ge, gp = ops.pixel_cluster_similarity_backward(go.to(dtype), e, p, out, 0.3, normalize)
    tag = f"pixel_cluster_similarity[{dtype} {shape} per_image={per_image} normalize={normalize}]"
    otol = TOL[dtype] if dtype != torch.bfloat16 else 8e-3  # output is in the input dtype
    chk(tag + " out", out.dtype == dtype and rel(out, outr) <= otol, f"{rel(out, outr):.2e}")
    # g_l = S (g - <g, S>) / tau cancels when one S_k is near 1 (as in PyTorch's softmax backward),
    # and g_e = P^T g_l for near-equal prototypes, so tiny degenerate shapes can exceed plain
    # rounding: rule "error <= same-dtype plain error + tol + 8 eps cond" (the reference's condition).
    ep, pp = e.clone().requires_grad_(), p.clone().requires_grad_()
    (R.pixel_cluster_similarity(ep, pp, 0.3, normalize=normalize) * go.to(dtype)).sum().backward()
    cond_e, cond_p = R.pixel_cluster_similarity_grad_condition(e, p, go, 0.3, normalize=normalize)
    eps = torch.finfo(torch.float32 if dtype == torch.bfloat16 else dtype).eps
    ptol_e = rel(ep.grad, er.grad) + 8 * eps * cond_e
    ptol_p = rel(pp.grad, pr.grad) + 8 * eps * cond_p
    chk(tag + " grad_e", rel(ge, er.grad) <= ptol_e + GTOL[dtype], f"{rel(ge, er.grad):.2e} (allowed {ptol_e:.2e} + tol)")
    chk(tag + " grad_p", gp.shape == p.shape and rel(gp, pr.grad) <= ptol_p + GTOL[dtype],
        f"{rel(gp, pr.grad):.2e} (allowed {ptol_p:.2e} + tol)")


def check_pd(ops, R, chk, dtype, md):
    m, d = md
    x = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    loss = ops.patch_discrimination(x, 0.1)
    xr = x.double().clone().requires_grad_()
    lr = R.patch_discrimination(xr, 0.1)
    (lr * 0.7).backward()
    g = ops.patch_discrimination_backward(torch.tensor(0.7, dtype=loss.dtype), x, 0.1)
    tag = f"patch_discrimination[{dtype} {md}]"
    chk(tag + " loss", rel(loss, lr) <= TOL[dtype], f"{rel(loss, lr):.2e}")
    chk(tag + " grad", rel(g, xr.grad) <= GTOL[dtype], f"{rel(g, xr.grad):.2e}")


def check_large_norms(ops, R, chk):
    """normalize=True with |z| ~ 1e25 in float32, where the per-pixel sum of squares overflows:
    dev_norm's rescaled path, in the register-blocked kernels (small K, D) and the general ones
    (K x D too large for them), forward and backward, against float64 (squares fine there)."""
    for shape in [(2, 5, 3, (6, 7)), (1, 200, 60, (5, 3))]:
        n, d, k, sp = shape
        z = (torch.randn(n, d, *sp, dtype=torch.float64) * 1e25).float()
        a = torch.randn(n, k, *sp, dtype=torch.float64).float()
        tag = f"large norms[{shape}]"
        feats, rnorm, _ = ops.region_features(z, a, True, 2, False)
        zr = z.double().requires_grad_()
        fr = R.region_features_bmm(zr, a.double(), normalize=True, assignment="softmax")
        w = torch.randn(n, k, d)
        (fr * w.double()).sum().backward()
        ge, _ = ops.region_features_backward(w, torch.zeros(()), z, a, feats, rnorm, True, 2, False)
        chk(tag + " region_features", rel(feats, fr) <= TOL[torch.float32], f"{rel(feats, fr):.2e}")
        chk(tag + " region_features grad_e", rel(ge, zr.grad) <= GTOL[torch.float32], f"{rel(ge, zr.grad):.2e}")
        p = torch.randn(k, d)
        out = ops.pixel_cluster_similarity(z, p, 0.5, True)
        zr = z.double().requires_grad_()
        outr = R.pixel_cluster_similarity(zr, p.double(), 0.5, normalize=True)
        g = torch.randn(out.shape)
        (outr * g.double()).sum().backward()
        ge, _ = ops.pixel_cluster_similarity_backward(g, z, p, out, 0.5, True)
        chk(tag + " pixel_cluster_similarity", rel(out, outr) <= TOL[torch.float32], f"{rel(out, outr):.2e}")
        chk(tag + " pixel_cluster_similarity grad_e", rel(ge, zr.grad) <= GTOL[torch.float32],
            f"{rel(ge, zr.grad):.2e}")


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set an environment variable that the emulated host code reads (a kernel knob) for a block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_region_features(ops, R, chk):
    rf_shapes = [(1, 2, 2, (1, 1)), (3, 5, 7, (13, 17)), (2, 32, 16, (20, 19)), (2, 3, 4, (129,)), (2, 6, 3, (5, 7, 9))]
    for dtype in DTYPES:
        for shape in rf_shapes:
            for mode in MODES:
                for normalize in (False, True):
                    check_region_features(ops, R, chk, dtype, shape, mode, normalize)
    # Several chunks per block (N=1 gets many tiles in the emulation), padded K and D of the
    # register-blocked path, and the general kernels with the opt-in shared memory (K x D too
    # large for the register-blocked path).
    for mode in MODES:
        check_region_features(ops, R, chk, torch.float32, (1, 8, 5, (70, 70)), mode, True)
        check_region_features(ops, R, chk, torch.float32, (1, 32, 16, (61, 67)), mode, True)
        check_region_features(ops, R, chk, torch.float64, (2, 33, 17, (37, 41)), mode, True)
        check_region_features(ops, R, chk, torch.float64, (2, 200, 60, (9, 11)), mode, True)
    with _env("LD_EXT_CUDA_RB_PREFETCH", "0"):  # each chunk read just before its use
        for mode in MODES:
            check_region_features(ops, R, chk, torch.float32, (1, 32, 16, (61, 67)), mode, True)
            check_region_features(ops, R, chk, torch.bfloat16, (2, 8, 5, (33, 35)), mode, False)


def run_region_discrimination(ops, R, chk):
    for dtype in DTYPES:
        for nkd in [(1, 1, 1), (2, 3, 5), (7, 16, 32), (3, 33, 130)]:
            check_region_discrimination(ops, R, chk, dtype, nkd)
    # identical features at a tiny temperature: every logit ~1/tau, the loss exactly log K
    # (issue 25: 0 when the row loss was formed as (max + log sum) - l_k); the exact gradient is 0,
    # any implementation's is rounding noise of a few eps / tau
    for dtype in (torch.float64, torch.float32):
        for tau in (1e-16, 1e-30, MIN_TEMPERATURE):
            r = torch.nn.functional.normalize(torch.randn(1, 1, 5, dtype=torch.float64), dim=2)
            r = r.expand(3, 4, 5).to(dtype).contiguous()
            loss = ops.region_discrimination(r, tau)
            g = ops.region_discrimination_backward(torch.tensor(1.0, dtype=loss.dtype), r, tau)
            tag = f"region_discrimination[{dtype} identical tau={tau:.1e}]"
            chk(tag + " loss", abs(loss.item() - math.log(4)) <= 1e-6 * math.log(4), f"{loss.item()!r}")
            bound = 64 * torch.finfo(dtype).eps / tau
            chk(tag + " grad", bool(torch.isfinite(g).all()) and g.abs().max().item() <= bound, f"{g.abs().max()}")


def run_pixel_cluster_similarity(ops, R, chk):
    for dtype in DTYPES:
        for shape in [(1, 2, 2, (1,)), (3, 5, 7, (13, 17)), (2, 32, 16, (16, 17)), (2, 4, 3, (5, 6, 7))]:
            for per_image in (False, True):
                for normalize in (False, True):
                    check_pcs(ops, R, chk, dtype, shape, per_image, normalize)
    check_pcs(ops, R, chk, torch.float32, (1, 8, 5, (70, 70)), True, True)
    check_pcs(ops, R, chk, torch.float64, (2, 200, 60, (9, 11)), False, True)
    with _env("LD_EXT_CUDA_RB_PREFETCH", "0"):
        check_pcs(ops, R, chk, torch.float32, (1, 8, 5, (70, 70)), True, True)
        check_pcs(ops, R, chk, torch.bfloat16, (2, 32, 16, (16, 17)), False, False)
    # tiny temperatures (issue 25: float32 NaN at tau ~ 3e-39, where <p, e> / tau overflowed):
    # one-hot outputs and zero gradients (no ties in these draws), in the register-blocked
    # kernels (small K x D) and the general ones (K x D too large for them)
    for dtype in (torch.float64, torch.float32):
        for shape in [(2, 3, 4, (5, 6)), (1, 200, 60, (3, 4))]:
            for per_image in (False, True):
                for tau in (MIN_TEMPERATURE, 3e-39, 1e-30):
                    check_pcs_tiny_temperature(ops, R, chk, dtype, shape, per_image, tau)


def check_pcs_tiny_temperature(ops, R, chk, dtype, shape, per_image, tau):
    n, d, k, sp = shape
    e = torch.randn(n, d, *sp, dtype=torch.float64).to(dtype)
    p = torch.randn(*((n, k, d) if per_image else (k, d)), dtype=torch.float64).to(dtype)
    for normalize in (False, True):
        out = ops.pixel_cluster_similarity(e, p, tau, normalize)
        er, pr = e.double().clone().requires_grad_(), p.double().clone().requires_grad_()
        outr = R.pixel_cluster_similarity(er, pr, tau, normalize=normalize)
        go = torch.randn_like(outr)
        (outr * go).sum().backward()
        ge, gp = ops.pixel_cluster_similarity_backward(go.to(dtype), e, p, out, tau, normalize)
        tag = f"pixel_cluster_similarity[{dtype} {shape} per_image={per_image} normalize={normalize} tau={tau:.1e}]"
        err = max((out.double() - outr).abs().max().item(), (ge.double() - er.grad).abs().max().item(),
                  (gp.double() - pr.grad).abs().max().item())
        finite = all(bool(torch.isfinite(t).all()) for t in (out, ge, gp))
        chk(tag, finite and err <= 1e-6, f"finite={finite} max abs error {err:.2e}")


def run_patch_discrimination(ops, R, chk):
    for dtype in DTYPES:
        for md in [(6, 3), (130, 32), (258, 300)]:
            check_pd(ops, R, chk, dtype, md)
    # every logit far below log 1e-10 (issue 25: 1e-10 exp(-max) overflowed: loss inf, NaN
    # gradient): M=2 anti-aligned rows and M=4 simplex rows at small temperatures, against the
    # float64 reference on the same inputs (float32: logits ~1/T carry eps32/T of rounding)
    u = torch.nn.functional.normalize(torch.randn(1, 6, dtype=torch.float64), dim=1)
    e = torch.eye(4, dtype=torch.float64)
    rows = {"anti-aligned": torch.cat([u, -u]), "simplex": torch.nn.functional.normalize(e - e.mean(0), dim=1)}
    for dtype in (torch.float64, torch.float32):
        for name, x64 in rows.items():
            for tau in (1e-3, 1e-4, 1e-30):
                x = x64.to(dtype)
                loss = ops.patch_discrimination(x, tau)
                g = ops.patch_discrimination_backward(torch.tensor(0.7, dtype=loss.dtype), x, tau)
                xr = x.double().clone().requires_grad_()
                lr = R.patch_discrimination(xr, tau)
                (lr * 0.7).backward()
                tol = 1e-10 if dtype == torch.float64 else 1e-6
                tag = f"patch_discrimination[{dtype} {name} tau={tau:.0e}]"
                chk(tag + " loss", rel(loss, lr) <= tol, f"{loss.item()!r} vs {lr.item()!r}")
                chk(tag + " grad", rel(g, xr.grad) <= tol, f"{rel(g, xr.grad):.2e}")


# Op -> the function that runs its checks, for every op of the registry (ld_ext/ops/registry.py).
RUNNERS = {
    "region_features": run_region_features,
    "region_discrimination": run_region_discrimination,
    "pixel_cluster_similarity": run_pixel_cluster_similarity,
    "patch_discrimination": run_patch_discrimination,
}
if set(RUNNERS) != set(REGISTRY.NAMES):
    raise SystemExit(f"run_emulated: checks written for {sorted(RUNNERS)}, the registry lists {sorted(REGISTRY.NAMES)}")


def main(argv=None) -> int:
    shorts = [op.short for op in REGISTRY.OPS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", choices=[*shorts, "norm"], action="append", default=None,
                    help="check only these ops (" + ", ".join(f"{op.short}: {op.name}" for op in REGISTRY.OPS)
                         + "; norm: per-pixel norms that overflow float32); repeatable; default all")
    args = ap.parse_args(argv)
    want = set(args.only or [*shorts, "norm"])
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"run_emulated: seed {seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="ld_ext_emu_")
    os.makedirs(build_dir, exist_ok=True)
    t0 = time.perf_counter()
    ops = build(build_dir)
    print(f"run_emulated: built in {time.perf_counter() - t0:.0f} s")
    R = _reference()
    chk = Checker()
    for op in REGISTRY.OPS:
        if op.short in want:
            RUNNERS[op.name](ops, R, chk)
    if "norm" in want:
        check_large_norms(ops, R, chk)
    print(f"run_emulated: {time.perf_counter() - t0:.0f} s")
    print(f"emulated CUDA kernels: {chk.passed} passed, {len(chk.failed)} failed")
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
