"""Bad input is refused with TypeError/ValueError naming the argument; never a crash."""
from __future__ import annotations

import pytest
import torch

import ld_ext

Z = torch.randn(2, 4, 5, 6)
S = torch.randn(2, 3, 5, 6)


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((Z[0, 0], S[0, 0]), {}, ValueError, ["embeddings", "(N, D, *spatial)"]),
        ((Z, S[0, 0]), {}, ValueError, ["assignments", "(N, K, *spatial)"]),
        ((Z, S[:1]), {}, ValueError, ["batch size"]),
        ((Z, S[..., :5]), {}, ValueError, ["spatial size"]),
        ((Z, S.unsqueeze(-1)), {}, ValueError, ["same number of dims"]),
        ((Z.long(), S), {}, TypeError, ["embeddings", "floating-point"]),
        ((Z, S.int()), {}, TypeError, ["assignments", "floating-point"]),
        ((Z, S.double()), {}, TypeError, ["same dtype"]),
        ((Z, S.to("meta")), {}, ValueError, ["same device"]),
        ((Z[:0], S[:0]), {}, ValueError, ["embeddings", "empty"]),
        ((Z[:, :0], S), {}, ValueError, ["embeddings", "empty"]),
        ((Z, S), {"assignment": "soft"}, ValueError, ["assignment", "'probs'"]),
        (([1.0], S), {}, TypeError, ["embeddings", "torch.Tensor"]),
        ((torch.randn(2, 4, 1, 1, 1, 1), torch.randn(2, 3, 1, 1, 1, 1)), {}, ValueError, ["1, 2 or 3 spatial dims"]),
    ],
)
def test_region_features_bad_input(args, kwargs, exc, words):
    calls = (
        lambda: ld_ext.region_features(*args, **kwargs),
        lambda: ld_ext.region_features_and_entropy(*args, **kwargs),
        lambda: ld_ext.RegionDiscriminationLoss(**kwargs)(*args),
    )
    for call in calls:
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("tau, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.2", TypeError), (True, TypeError)])
def test_bad_temperature(tau, exc):
    r = torch.randn(2, 3, 4)
    x = torch.randn(4, 3)
    for call in (
        lambda: ld_ext.region_discrimination(r, tau),
        lambda: ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 4), tau),
        lambda: ld_ext.patch_discrimination(x, tau),
        lambda: ld_ext.RegionDiscriminationLoss(temperature=tau),
        lambda: ld_ext.PatchDiscriminationLoss(temperature=tau),
    ):
        with pytest.raises(exc, match="temperature"):
            call()


def test_loss_module_bad_assignment():
    with pytest.raises(ValueError, match="assignment"):
        ld_ext.RegionDiscriminationLoss(assignment="l1")


def test_region_discrimination_bad_input():
    with pytest.raises(ValueError, match=r"region_feats must have shape \(N, K, D\)"):
        ld_ext.region_discrimination(torch.randn(3, 4))
    with pytest.raises(ValueError, match="region_feats must not be empty"):
        ld_ext.region_discrimination(torch.randn(0, 4, 5))
    with pytest.raises(TypeError, match="region_feats"):
        ld_ext.region_discrimination(torch.ones(2, 3, 4, dtype=torch.int64))


def test_pixel_cluster_similarity_bad_input():
    with pytest.raises(ValueError, match="prototypes must have shape \\(K, D\\) with D=4"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="prototypes must have shape \\(N, K, D\\) with N=2"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="prototypes must have shape"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(4))
    with pytest.raises(TypeError, match="same dtype"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="prototypes must not be empty"):
        ld_ext.pixel_cluster_similarity(Z, torch.randn(0, 4))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        ld_ext.pixel_cluster_similarity(torch.randn(4, 5), torch.randn(3, 4))


def test_patch_discrimination_bad_input():
    with pytest.raises(ValueError, match="even number of rows"):
        ld_ext.patch_discrimination(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(M, D\)"):
        ld_ext.patch_discrimination(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="x must not be empty"):
        ld_ext.patch_discrimination(torch.randn(0, 3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ld_ext.patch_discrimination(torch.ones(4, 3, dtype=torch.int32))


def test_double_backward_is_refused():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    s = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid")(z, s)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    x = torch.nn.functional.normalize(torch.randn(6, 3), dim=1).requires_grad_(True)
    (gx,) = torch.autograd.grad(ld_ext.patch_discrimination(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
    p = torch.randn(3, 3, requires_grad=True)
    out = ld_ext.pixel_cluster_similarity(z, p)
    (gp,) = torch.autograd.grad(out.square().sum(), p, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gp.sum().backward()
