"""3-D views with small affine + elastic warps and an exact inverse (docs/method.md section 10):
the elastic map's closed-form inverse, exact alignment of v2 onto v1 on a coordinate volume, the
margin that keeps warped views inside the read patch, the warps-off generator equal to the one
before warps existed (bitwise), per-item determinism, and the objective's aligned rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ld_ext.augment import (
    ELASTIC_FREQ,
    ELASTIC_TERMS,
    NORM_MEAN,
    NORM_STD,
    VolumeAugmentConfig,
    VolumeViewGenerator,
    align_to_v1_3d,
    elastic_warp,
    item_generator,
    normalize_intensity,
    view_margin,
)
from ld_ext.objective import LDObjective

S = 16
NO_INTENSITY = dict(brightness=0.0, contrast=0.0)


def _coef(amplitude: float, seed: int) -> torch.Tensor:
    """Elastic coefficients as the generator draws them, with every function at full amplitude."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, ELASTIC_TERMS, 4, generator=g, dtype=torch.float64)
    amp = amplitude * torch.sign(2 * u[..., 0] - 1) / ELASTIC_TERMS
    return torch.cat([amp[..., None], ELASTIC_FREQ * (2 * u[..., 1:3] - 1), 2 * math.pi * u[..., 3:]], -1)


# ------------------------------------------------------------------------------------ elastic map


@pytest.mark.parametrize("amplitude", [0.03, 0.2])
def test_elastic_inverse_composed_with_the_map_is_the_identity(amplitude):
    """float64, random points (also outside the patch): E^-1(E(p)) = p and E(E^-1(p)) = p to
    rounding; each shear step has unit Jacobian determinant, so E preserves volume (no folding)."""
    g = torch.Generator().manual_seed(1)
    for seed in range(5):
        coef = _coef(amplitude, seed)
        p = 3 * torch.rand(2000, 3, generator=g, dtype=torch.float64) - 1.5
        q = elastic_warp(p, coef)
        assert (q - p).abs().max() > amplitude / 10  # the map does move points
        assert (q - p).abs().max() <= amplitude + 1e-12  # each coordinate moves by at most the amplitude
        torch.testing.assert_close(elastic_warp(q, coef, inverse=True), p, rtol=0, atol=1e-12)
        torch.testing.assert_close(elastic_warp(elastic_warp(p, coef, inverse=True), coef), p, rtol=0, atol=1e-12)
        for point in p[:5]:
            jac = torch.autograd.functional.jacobian(lambda x: elastic_warp(x, coef), point)
            assert float(torch.linalg.det(jac)) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------ alignment


def _coordinate_volume(r: int) -> torch.Tensor:
    """(1, 3, r, r, r) float64: the (X, Y, Z) position of each voxel centre, mapped from [-1, 1] to [0, 1]."""
    axis = (torch.arange(r, dtype=torch.float64) * 2 + 1) / r - 1
    return (torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))[None] + 1) / 2


@pytest.mark.parametrize("size", [16, 24])
def test_v2_of_a_coordinate_volume_aligns_onto_v1(size):
    """Views of a volume whose channels are the source coordinates; v2 aligned with ``align_v2``
    must give, at every v1 voxel, v1's source coordinate.

    Tolerance: trilinear sampling reproduces a linear function exactly, so v1 holds T1(p) and v2
    holds T2 at its voxel centres to rounding; resampling v2 at q = T2^-1(T1(p)) interpolates T2
    trilinearly, which errs by at most h^2/8 * sum_i |d^2 T2 / dx_i^2| (h = 2/S, one output voxel).
    E's components have second derivatives <= 2 pi^2 * amplitude * (1 + its Lipschitz constant)^2
    (two-frequency cosines composed up to twice); times the affine's max row sum (< 1.25) and the
    crop scale S/R, halved for the [0, 1] units. Only v1 voxels whose q lies within v2's voxel
    centres are compared (beyond them border padding holds v2's edge value). Alignment by v2's
    flips and turns alone (the generator before warps) must miss by more than a voxel."""
    cfg = VolumeAugmentConfig(**NO_INTENSITY)
    g = VolumeViewGenerator(size, cfg)
    r = g.read_size
    lip = math.pi * math.sqrt(2) * ELASTIC_FREQ * cfg.elastic
    d2 = 2 * math.pi**2 * cfg.elastic * (1 + lip) ** 2
    tol = (2 / size) ** 2 / 8 * 3 * d2 * 1.25 * size / r / 2
    src = _coordinate_volume(r)
    for seed in range(4):
        vb = g(src, src, [item_generator(seed, 7)])
        assert vb.exact_align and vb.elastic is not None
        im = vb.images * NORM_STD + NORM_MEAN
        v1, v2 = im[:2], im[2:4]
        q = vb.v2_coordinates((size,) * 3)
        inside = (q.abs() <= 1 - 1 / size).all(-1)  # (2, S, S, S)
        assert inside.float().mean() > 0.5  # most of v1 is compared
        err = (vb.align_v2(v2) - v1).abs().amax(1)[inside]
        assert float(err.max()) < tol, (float(err.max()), tol)
        old = (align_to_v1_3d(v2, vb.flips, vb.rot_k) - v1).abs().amax(1)[inside]
        assert float(old.max()) * r > 1.0  # more than one source voxel off without the exact inverse


def test_v1_cells_outside_v2_are_rare_and_take_the_border_value():
    """At the default grid of 4^3 sub-cubes and the default recipe, no v1 cell centre falls outside
    v2's field in 40 draws; a point outside takes v2's nearest edge value (border padding)."""
    g = VolumeViewGenerator(32)
    r = g.read_size
    ones = torch.ones(1, 1, r, r, r)
    for seed in range(40):
        q = g(ones, ones, [item_generator(seed, 3)]).v2_coordinates((4, 4, 4))
        assert float(q.abs().max()) <= 1.0
    vb = VolumeViewGenerator(S, VolumeAugmentConfig(view_rotation=0.0, view_scale=0.0, view_shear=0.0,
                                                           elastic=0.0, v2_flip_p=0.0, v2_rot90=False))(
        torch.rand(1, 1, S, S, S), torch.rand(1, 1, S, S, S), [item_generator(0, 0)])
    vb.lin[2:, 0, 0] = 0.5  # v2's X axis at half scale: v1's outer X cells lie outside v2
    x = torch.arange(4, dtype=torch.float64).view(1, 1, 4, 1, 1).expand(2, 1, 4, 4, 4)
    got = vb.align_v2(x)[0, 0, :, 0, 0]
    assert (vb.v2_coordinates((4, 4, 4))[..., 0].abs() > 1).any()
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5, 2.5, 3.0], dtype=torch.float64))  # q = 2p


# ----------------------------------------------------------------------------------- the margin


@pytest.mark.parametrize(
    "cfg",
    [
        VolumeAugmentConfig(**NO_INTENSITY),
        VolumeAugmentConfig(view_rotation=10.0, view_scale=0.3, view_shear=0.2, elastic=0.2, **NO_INTENSITY),
        VolumeAugmentConfig.unwarped(view_rotation=0.0, elastic=0.2, **NO_INTENSITY),
    ],
    ids=["recipe", "strong", "elastic-only"],
)
@pytest.mark.parametrize("size", [16, 21])
def test_warped_views_never_sample_outside_the_read_patch(cfg, size):
    """A volume of ones read with the margin, zeros outside (grid_sample's padding): every voxel
    of every view stays one, so no warp reaches past the patch."""
    g = VolumeViewGenerator(size, cfg)
    assert g.margin == view_margin(size, cfg) > 0
    r = g.read_size
    ones = torch.ones(4, 1, r, r, r)
    for seed in range(6):
        vb = g(ones[:2], ones[2:], [item_generator(seed, i) for i in range(2)])
        torch.testing.assert_close(vb.images, torch.full_like(vb.images, (1 - NORM_MEAN) / NORM_STD))
    # and the margin is needed: the same views read without it do sample zeros
    vb = VolumeViewGenerator(size, cfg)(torch.ones(1, 1, size, size, size), torch.ones(1, 1, size, size, size),
                                        [item_generator(0, 0)])
    assert float(vb.images.min()) < (1 - NORM_MEAN) / NORM_STD - 0.1


# --------------------------------------------------------------------- warps off = the old views


def _old_views(size, cfg, img1, img2, generators):
    """The volume view generator as it was before warps existed (frozen copy, for the bitwise test)."""

    def u(g, lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def source(g):
        fl = [-1.0 if (cfg.src_flip and float(torch.rand((), generator=g)) < 0.5) else 1.0 for _ in range(3)]
        k = int(torch.randint(0, 4, (), generator=g)) if cfg.src_rot90 else 0
        rot = torch.eye(3, dtype=torch.float64)
        for _ in range(k):
            rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ rot
        return torch.diag(torch.tensor(fl, dtype=torch.float64)) @ rot

    def view(g):
        m = torch.eye(3, dtype=torch.float64)
        for axis in range(3):
            a = math.radians(u(g, -cfg.view_rotation, cfg.view_rotation))
            c, s = math.cos(a), math.sin(a)
            i, j = [x for x in range(3) if x != axis]
            r = torch.eye(3, dtype=torch.float64)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            m = r @ m
        return m, [u(g, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
                   u(g, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)]

    b = len(generators)
    mats, inten = [[None] * b for _ in range(4)], [[None] * b for _ in range(4)]
    flips, rk, mw = [], [], []
    for i, g in enumerate(generators):
        src = [source(g), source(g)]
        for v in range(2):
            for j in range(2):
                vm, it = view(g)
                mats[2 * v + j][i], inten[2 * v + j][i] = src[j] @ vm, it
        for _ in range(2):
            flips.append([cfg.v2_flip_p > 0 and float(torch.rand((), generator=g)) < cfg.v2_flip_p for _ in range(3)])
            rk.append(int(torch.randint(0, 4, (), generator=g)) if cfg.v2_rot90 else 0)
        mw.append(u(g, *cfg.mix_range))
    flips = torch.tensor(flips[0::2] + flips[1::2], dtype=torch.bool)
    rk = torch.tensor(rk[0::2] + rk[1::2])
    mats = [m for grp in mats for m in grp]
    scale = torch.diag(torch.tensor([size / n for n in img1.shape[2:]], dtype=torch.float64))
    rev = torch.eye(3, dtype=torch.float64).flip(0)
    theta = torch.stack([rev @ scale @ m @ rev for m in mats])
    theta = torch.cat([theta, torch.zeros(4 * b, 3, 1, dtype=torch.float64)], dim=2).to(img1.dtype)
    grid = F.affine_grid(theta, [4 * b, img1.shape[1], size, size, size], align_corners=False)
    views = F.grid_sample(torch.cat([img1, img2, img1, img2]), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    p = torch.tensor([x for grp in inten for x in grp], dtype=torch.float64).to(views.dtype).view(-1, 2, 1, 1, 1, 1)
    views = (views * p[:, 0]).clamp(0, 1)
    m = views.mean(dim=(1, 2, 3, 4), keepdim=True)
    views = ((views - m) * p[:, 1] + m).clamp(0, 1)
    v2 = views[2 * b:]
    v2_list = []
    for i in range(2 * b):
        x = v2[i]
        dims = [d for d, f in zip((-3, -2, -1), flips[i].tolist()) if f]
        x = torch.flip(x, dims) if dims else x
        v2_list.append(torch.rot90(x, int(rk[i]), dims=(-3, -2)) if int(rk[i]) else x)
    w = torch.tensor(mw, dtype=img1.dtype).view(-1, 1, 1, 1, 1)
    mix = w * views[:b] + (1 - w) * views[b:2 * b]
    return normalize_intensity(torch.cat([views[:2 * b], torch.stack(v2_list), mix])), flips, rk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warps_off_is_the_generator_before_warps_bitwise(dtype):
    """``VolumeAugmentConfig.unwarped()``: same read size, same views bit for bit, same draws,
    and ``align_v2`` only undoes v2's flips and turns, as before."""
    cfg = VolumeAugmentConfig.unwarped()
    g = VolumeViewGenerator(S, cfg)
    old_margin = math.ceil(math.sqrt(3) * S / 2 * 3 * math.radians(cfg.view_rotation)) + 1
    assert g.read_size == S + 2 * old_margin
    r = g.read_size
    src = torch.rand(6, 1, r, r, r, generator=torch.Generator().manual_seed(0)).to(dtype)
    new = g(src[:3], src[3:], [item_generator(9, i) for i in range(3)])
    old, flips, rk = _old_views(S, cfg, src[:3], src[3:], [item_generator(9, i) for i in range(3)])
    assert torch.equal(new.images, old) and torch.equal(new.flips, flips) and torch.equal(new.rot_k, rk)
    assert not new.exact_align and new.lin is None and new.elastic is None
    f = torch.rand(6, 3, 4, 4, 4, dtype=dtype)
    assert torch.equal(new.align_v2(f), align_to_v1_3d(f, flips, rk))
    rec = VolumeViewGenerator(S)
    assert rec.cfg == VolumeAugmentConfig() and rec.read_size > r
    # the defaults are the recipe: changing one range keeps the warps (a user's config is not silently unwarped)
    mine = VolumeAugmentConfig(brightness=0.3)
    assert (mine.view_scale, mine.view_shear, mine.elastic, mine.exact_align) == (0.05, 0.03, 0.03, True)


def test_one_draw_per_item_gives_the_same_views():
    """Views depend on the item's generator only: the same seeds give the same views and
    recorded maps; an item alone equals the same item inside a batch; another seed differs."""
    g = VolumeViewGenerator(S)
    r = g.read_size
    src = torch.rand(4, 1, r, r, r, generator=torch.Generator().manual_seed(2))
    a = g(src[:2], src[2:], [item_generator(3, i) for i in range(2)])
    b = g(src[:2], src[2:], [item_generator(3, i) for i in range(2)])
    assert torch.equal(a.images, b.images) and torch.equal(a.lin, b.lin) and torch.equal(a.elastic, b.elastic)
    alone = g(src[1:2], src[3:4], [item_generator(3, 1)])
    assert torch.equal(alone.images[0], a.images[1]) and torch.equal(alone.elastic[0], a.elastic[1])
    other = g(src[:2], src[2:], [item_generator(4, i) for i in range(2)])
    assert not torch.equal(other.images, a.images)


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match=r"VolumeAugmentConfig.elastic must be a number in \[0, 0.225\)"):
        VolumeViewGenerator(S, VolumeAugmentConfig(elastic=0.3))
    with pytest.raises(ValueError, match=r"VolumeAugmentConfig.view_scale must be a number in \[0, 0.5\]"):
        VolumeViewGenerator(S, VolumeAugmentConfig(view_scale=-0.1))
    with pytest.raises(ValueError, match="view_shear"):
        VolumeViewGenerator(S, VolumeAugmentConfig(view_shear=True))
    vb = VolumeViewGenerator(S, VolumeAugmentConfig.unwarped())(torch.rand(1, 1, 22, 22, 22), torch.rand(1, 1, 22, 22, 22),
                                                        [item_generator(0)])
    with pytest.raises(ValueError, match="records no warps"):
        vb.v2_coordinates((4, 4, 4))


# ------------------------------------------------------------------------------------ objective


def test_objective_pairs_unit_rows_after_exact_alignment():
    """The interpolated v2 cells are normalised again before the PD criterion, which takes unit rows."""
    g = VolumeViewGenerator(S)
    r = g.read_size
    vb = g(torch.rand(2, 1, r, r, r, dtype=torch.float64), torch.rand(2, 1, r, r, r, dtype=torch.float64),
           [item_generator(1, i) for i in range(2)])
    z = torch.cat([vb.images, vb.images.cos(), (2 * vb.images).sin()], dim=1)  # (10, 3, S, S, S)
    obj = LDObjective("reference", grid=4)
    seen = []
    inner = obj.patch_loss.forward
    obj.patch_loss.forward = lambda a, b: seen.append((a, b)) or inner(a, b)
    obj(z, None, vb)
    a, b = seen[0]
    assert a.shape == b.shape == (4 * 64, 3)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(4 * 64, dtype=torch.float64), rtol=0, atol=1e-9)
