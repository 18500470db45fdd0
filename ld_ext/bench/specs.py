"""What the benchmarks measure: one ``OpSpec`` per fused op (inputs, implementations, backward,
floor and memory estimate) and the problem sizes (``Case``).

Implementations: ``fused`` (the ld_ext ops / loss modules), ``eager`` (the efficient plain-PyTorch
formulation of ``ld_ext.reference``), ``compile`` (``torch.compile`` of ``eager``) and
``published`` (the published code's formulation: the broadcast product e[:, None] * a[:, :, None]
for region features, exp-then-normalise for the criteria).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import ld_ext  # the fused side is measured through the public API, as a user calls it

from .. import reference as ref
from ..normalization import NORM_EPS
from ..objective import W_ENT, W_RD

__all__ = ["IMPLS", "MODES", "BASE", "HEADLINE_KW", "Case", "OpSpec", "OPS", "make_generator"]

IMPLS = ("fused", "eager", "compile", "published")
MODES = ("fwd", "fwd+bwd")

# The headline configuration (core issue) and the base of every sweep.
BASE = dict(N=16, D=32, K=16, H=128, W=128)
HEADLINE_KW = dict(normalize=True, assignment="sigmoid", return_entropy=True)


@dataclass(frozen=True)
class Case:
    """One problem size. For ``patch_discrimination`` only M (rows) and D are used."""

    N: int = 16
    D: int = 32
    K: int = 16
    H: int = 128
    W: int = 128
    M: int = 1024  # 4*B*G*G rows of the PD criterion, B=4, G=8 (docs/method.md section 5)
    dtype: str = "float32"

    @property
    def P(self) -> int:
        return self.H * self.W

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, c: Case, device, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(c.torch_dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _rd_published(feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd as the published code writes it: exp of the logits, normalise, -log of the diagonal."""
    c = feats.mean(dim=0)
    c = c / (torch.norm(c, p=2, dim=1, keepdim=True) + NORM_EPS)
    logits = torch.exp(torch.einsum("nkd,jd->nkj", feats, c) / temperature)
    prob = logits / logits.sum(dim=2, keepdim=True)
    return -torch.log(torch.diagonal(prob, dim1=1, dim2=2)).mean()


@dataclass
class OpSpec:
    """How to benchmark one op: inputs, implementations, backward, floor and memory estimate."""

    name: str
    title: str
    make_inputs: Callable  # (case, device, generator) -> tuple of tensors (all differentiable)
    impls: dict  # impl name -> factory() -> callable(*inputs) -> output(s)
    scalar: Callable | None  # outputs -> scalar loss for backward; None: use a random cotangent
    bytes: Callable  # (case, mode) -> minimum bytes moved
    flops: Callable  # (case, mode) -> FLOPs (the matmul-like products)
    big_bytes: Callable  # (case, impl, mode) -> rough peak bytes of the impl (to skip what cannot fit)
    config: str = ""
    sweepable: bool = False


def _fused():
    """The package whose public functions and modules are the fused side of every spec."""
    return ld_ext


def _loss_scalar(out):
    rd, ent = out
    return W_RD * rd + W_ENT * ent


def _rl_inputs(c: Case, device, g):
    e = _randn((c.N, c.D, c.H, c.W), c, device, g)
    s = _randn((c.N, c.K, c.H, c.W), c, device, g)
    return e, s


def _rl_bytes(c: Case, mode: str) -> int:
    inp = (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize
    # forward reads both inputs once; the backward reads them again and writes their gradients
    return inp if mode == "fwd" else 3 * inp


def _rl_flops(c: Case, mode: str) -> int:
    f = 2 * c.N * c.K * c.D * c.P  # r~ = a e^T
    return f if mode == "fwd" else 3 * f  # + grad_e = a^T g, grad_a = g e


def _rl_big(c: Case, impl: str, mode: str) -> int:
    inp = (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize
    prod = c.N * c.K * c.D * c.P * c.itemsize
    if impl == "published":
        return prod + 2 * inp if mode == "fwd" else 3 * prod + 4 * inp
    return 3 * inp if mode == "fwd" else 8 * inp


def _region_loss_spec() -> OpSpec:
    kw = HEADLINE_KW

    def fused():
        return _fused().RegionDiscriminationLoss(temperature=0.2, **kw)

    def eager():
        return lambda e, s: ref.region_discrimination_loss(e, s, temperature=0.2, **kw)

    def published():
        return lambda e, s: ref.region_discrimination_loss_broadcast(e, s, temperature=0.2, **kw)

    return OpSpec(
        name="region_loss",
        title="RegionDiscriminationLoss (10*L_rd + 0.1*L_ent)",
        make_inputs=_rl_inputs,
        impls={"fused": fused, "eager": eager, "compile": eager, "published": published},
        scalar=_loss_scalar,
        bytes=_rl_bytes,
        flops=_rl_flops,
        big_bytes=_rl_big,
        config='normalize=True, assignment="sigmoid", return_entropy=True, tau=0.2',
        sweepable=True,
    )


def _region_features_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        e = _randn((c.N, c.D, c.H, c.W), c, device, g)
        a = torch.softmax(_randn((c.N, c.K, c.H, c.W), c, device, g).float(), dim=1).to(c.torch_dtype)
        return e, a

    return OpSpec(
        name="region_features",
        title="region_features",
        make_inputs=inputs,
        impls={
            "fused": lambda: lambda e, a: _fused().region_features(e, a),
            "eager": lambda: lambda e, a: ref.region_features_bmm(e, a),
            "compile": lambda: lambda e, a: ref.region_features_bmm(e, a),
            "published": lambda: lambda e, a: ref.region_features_broadcast(e, a),
        },
        scalar=None,
        bytes=_rl_bytes,
        flops=_rl_flops,
        big_bytes=_rl_big,
        config='normalize=False, assignment="probs"',
    )


def _region_discrimination_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        return (_unit(_randn((c.N, c.K, c.D), c, device, g)),)

    def nbytes(c: Case, mode: str) -> int:
        b = c.N * c.K * c.D * c.itemsize
        return b if mode == "fwd" else 3 * b

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.N * c.K * c.K * c.D
        return f if mode == "fwd" else 3 * f

    return OpSpec(
        name="region_discrimination",
        title="region_discrimination",
        make_inputs=inputs,
        impls={
            "fused": lambda: lambda r: _fused().region_discrimination(r, 0.2),
            "eager": lambda: lambda r: ref.region_discrimination(r, 0.2),
            "compile": lambda: lambda r: ref.region_discrimination(r, 0.2),
            "published": lambda: lambda r: _rd_published(r, 0.2),
        },
        scalar=lambda out: out,
        bytes=nbytes,
        flops=flops,
        big_bytes=lambda c, impl, mode: 64 * c.N * c.K * max(c.K, c.D) * c.itemsize,
        config="tau=0.2, (N, K, D) unit rows",
    )


def _pixel_cluster_similarity_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        e = _randn((c.N, c.D, c.H, c.W), c, device, g)
        proto = _unit(_randn((c.N, c.K, c.D), c, device, g))
        return e, proto

    def nbytes(c: Case, mode: str) -> int:
        e, o, p = c.N * c.D * c.P, c.N * c.K * c.P, c.N * c.K * c.D
        fwd = (e + p + o) * c.itemsize
        # backward: read grad_out and e again (S recomputed or re-read: counted once), write grad_e
        return fwd if mode == "fwd" else fwd + (o + e + e + p) * c.itemsize

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.N * c.K * c.D * c.P
        return f if mode == "fwd" else 3 * f

    def big(c: Case, impl: str, mode: str) -> int:
        return 8 * (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize

    return OpSpec(
        name="pixel_cluster_similarity",
        title="pixel_cluster_similarity",
        make_inputs=inputs,
        impls={
            "fused": lambda: lambda e, p: _fused().pixel_cluster_similarity(e, p, 0.2, normalize=True),
            "eager": lambda: lambda e, p: ref.pixel_cluster_similarity(e, p, 0.2, normalize=True),
            "compile": lambda: lambda e, p: ref.pixel_cluster_similarity(e, p, 0.2, normalize=True),
        },
        scalar=None,
        bytes=nbytes,
        flops=flops,
        big_bytes=big,
        config="per-image prototypes (N, K, D), normalize=True, tau=0.2",
    )


def _patch_discrimination_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        return (_unit(_randn((c.M, c.D), c, device, g)),)

    def nbytes(c: Case, mode: str) -> int:
        b = c.M * c.D * c.itemsize
        return b if mode == "fwd" else 3 * b

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.M * c.M * c.D
        return f if mode == "fwd" else 2 * f

    return OpSpec(
        name="patch_discrimination",
        title="patch_discrimination",
        make_inputs=inputs,
        impls={
            "fused": lambda: _fused().PatchDiscriminationLoss(temperature=0.1),
            "eager": lambda: lambda x: ref.patch_discrimination(x, 0.1),
            "compile": lambda: lambda x: ref.patch_discrimination(x, 0.1),
            "published": lambda: lambda x: ref.patch_discrimination_published(x, 0.1),
        },
        scalar=lambda out: out,
        bytes=nbytes,
        flops=flops,
        big_bytes=lambda c, impl, mode: 12 * c.M * c.M * c.itemsize,
        config="T=0.1, M=4*B*G*G rows (B=4, G=8)",
    )


OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        _region_loss_spec(),
        _region_features_spec(),
        _region_discrimination_spec(),
        _pixel_cluster_similarity_spec(),
        _patch_discrimination_spec(),
    )
}
