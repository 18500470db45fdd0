"""torch.compile(fullgraph=True) of a module that uses the fused losses."""
from __future__ import annotations

import torch
from torch import nn

import ld_ext
from ld_ext import reference as R


class _TinyLD(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Conv2d(1, 8, 3, padding=1)
        self.clu = nn.Conv2d(1, 4, 3, padding=1)
        self.rd = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)
        self.pd = ld_ext.PatchDiscriminationLoss()

    def forward(self, x):
        z, s = self.emb(x), self.clu(x)
        lrd, lent = self.rd(z, s)
        patches = torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(z, 2).flatten(2).transpose(1, 2).reshape(-1, 8), dim=1)
        sim = ld_ext.pixel_cluster_similarity(z, ld_ext.region_features(z, s, normalize=True, assignment="sigmoid"), normalize=True)
        return 10 * lrd + 0.1 * lent + self.pd(patches) + sim.mean()


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _TinyLD()
    x = torch.randn(4, 1, 12, 12)
    eager = model(x)
    geager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    gcomp = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(gcomp, geager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_formulation_compiles_too():
    z = torch.randn(2, 8, 10, 10)
    s = torch.randn(2, 4, 10, 10)
    fn = torch.compile(lambda a, b: R.region_discrimination_loss(a, b, normalize=True, assignment="sigmoid"), fullgraph=True)
    torch.testing.assert_close(fn(z, s), ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid")(z, s), rtol=1e-5, atol=1e-6)


def test_compile_dynamic_shapes():
    """dynamic=True: the fake kernels' argument checks (csrc/checks.h through ld_ext._C) run on
    symbolic sizes, and the temperature check traces with a symbolic float."""

    def f(z, s, x, p):
        r = ld_ext.region_features(z, s, normalize=True, assignment="sigmoid")
        sim = ld_ext.pixel_cluster_similarity(z, p, normalize=True)
        return ld_ext.region_discrimination(r) + ld_ext.patch_discrimination(x) + sim.mean()

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for n, h in ((2, 6), (3, 9)):
        args = (
            torch.randn(n, 4, h, h, generator=g),
            torch.randn(n, 3, h, h, generator=g),
            torch.nn.functional.normalize(torch.randn(2 * n, 4, generator=g), dim=1),
            torch.randn(3, 4, generator=g),
        )
        a = [t.clone().requires_grad_(True) for t in args]
        b = [t.clone().requires_grad_(True) for t in args]
        out_c, out_e = compiled(*a), f(*b)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        for u, v in zip(torch.autograd.grad(out_c, a), torch.autograd.grad(out_e, b)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)
