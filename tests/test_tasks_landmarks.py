"""Tests of ld_ext.tasks.landmarks: pooling, fused cosine maps, search, NCC, points, CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ld_ext.checkpoint import save_checkpoint
from ld_ext.models import LDNet
from ld_ext.tasks import landmarks as lm


def _smooth_unit_embeddings(d=8, h=48, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(1, d, h // 4, w // 4, generator=g, dtype=torch.float64), size=(h, w), mode="bicubic")
    x = x + 0.3 * torch.randn(1, d, h, w, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def test_pooling_kernel_properties():
    g = lm.pooling_kernel(4, "gaussian", torch.float64)
    u = lm.pooling_kernel(4, "uniform", torch.float64)
    assert g.shape == (9, 9)
    assert g.sum().item() == pytest.approx(1.0) and u.sum().item() == pytest.approx(1.0)
    assert g[4, 4] > u[4, 4]  # centre-weighted
    assert g[0, 0] == 0 and u[0, 0] == 0  # disc support
    assert torch.equal(g > 0, u > 0)  # the same support
    wide = lm.pooling_kernel(4, "gaussian", torch.float64, sigma_frac=2.0)
    assert u[4, 4] < wide[4, 4] < g[4, 4]
    assert lm.pooling_kernel(0).item() == 1.0
    with pytest.raises(ValueError, match="mode"):
        lm.pooling_kernel(2, "box")


def test_pooled_descriptors_match_direct_convolution():
    e = _smooth_unit_embeddings(d=3, h=20, w=17)
    desc = lm.pooled_descriptors(e, radii=(2,), mode="gaussian")
    k = lm.pooling_kernel(2, "gaussian", torch.float64)
    num = F.conv2d(F.pad(e, (2, 2, 2, 2)), k.expand(3, 1, 5, 5), groups=3)
    den = F.conv2d(F.pad(torch.ones(1, 1, 20, 17, dtype=torch.float64), (2, 2, 2, 2)), k[None, None])
    ref = num / den
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(desc, ref, atol=1e-10)
    two = lm.pooled_descriptors(e, radii=(1, 3))
    assert torch.allclose(two.norm(dim=1), torch.ones(1, 20, 17, dtype=torch.float64))


@pytest.mark.parametrize("per_image", [False, True])
def test_cosine_maps_through_fused_op_are_exact(per_image):
    e = _smooth_unit_embeddings(d=6, h=12, w=10)
    protos = torch.randn(5, 6, dtype=torch.float64)
    protos = protos / protos.norm(dim=1, keepdim=True)
    ref = torch.einsum("kd,ndhw->nkhw", protos, e)
    got = lm.cosine_maps(e, protos[None] if per_image else protos)
    assert torch.allclose(got, ref, atol=1e-9)


def test_subpixel_peak_recovers_parabola_vertex():
    yy, xx = np.mgrid[0:9, 0:9]
    s = -((xx - 4.3) ** 2) - 2 * (yy - 3.8) ** 2
    x, y = lm.subpixel_peak(s, 4, 4)
    assert x == pytest.approx(4.3) and y == pytest.approx(3.8)
    bx, by = lm.subpixel_peak(s, 0, 4)  # border row: y kept
    assert bx == pytest.approx(4.3) and by == 0


def test_subpixel_quadratic_handles_the_cross_term():
    # an elongated, rotated peak: the per-axis parabola is biased, the 2-D quadratic is exact
    yy, xx = np.mgrid[0:9, 0:9].astype(float)
    dx, dy = xx - 4.3, yy - 3.8
    s = -(dx**2 + 1.6 * dx * dy + dy**2)
    x, y = lm.subpixel_peak(s, 4, 4, "quadratic")
    assert x == pytest.approx(4.3, abs=1e-9) and y == pytest.approx(3.8, abs=1e-9)
    px, py = lm.subpixel_peak(s, 4, 4, "parabola")
    assert abs(px - 4.3) + abs(py - 3.8) > 0.1
    flat = np.zeros((5, 5))  # no maximum: falls back to the integer peak
    assert lm.subpixel_peak(flat, 2, 2, "quadratic") == (2.0, 2.0)
    with pytest.raises(ValueError, match="method"):
        lm.subpixel_peak(s, 4, 4, "cubic")


def test_peak_candidates_are_sorted_local_maxima():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = lambda x, y, a: a * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.0)
    maps = torch.stack([blob(5, 6, 1.0) + blob(20, 25, 0.7) + blob(28, 3, 0.4)])
    xy, sc = lm.peak_candidates(maps, k=3)
    assert xy.shape == (1, 3, 2) and sc.shape == (1, 3)
    assert xy[0].tolist() == [[5, 6], [20, 25], [28, 3]]
    assert np.all(np.diff(sc[0]) < 0)


def _affine(angle_deg, scale, shift):
    th = np.radians(angle_deg)
    lin = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return np.concatenate([lin.T, np.asarray(shift, float)[None]], 0)  # (3, 2): [p, 1] @ b


def test_fit_affine_exact_and_weighted():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 60, (7, 2))
    b = _affine(20, 1.1, (3.0, -2.0))
    assert np.allclose(lm.fit_affine(src, lm.apply_affine(b, src)), b)
    dst = lm.apply_affine(b, src)
    dst[0] += 30  # an outlier with zero weight does not count
    assert np.allclose(lm.fit_affine(src, dst, np.r_[0.0, np.ones(6)]), b)


def _mirror_case(seed=0, m=12, k=3):
    """Landmarks of a left-right symmetric layout; for 5 of them the best candidate peak is the
    mirror-image position (the typical LD/NCC confusion), the true one is ranked second."""
    rng = np.random.default_rng(seed)
    pts = np.c_[rng.uniform(8, 56, m), rng.uniform(8, 56, m)]
    b = _affine(12, 1.05, (2.0, -1.5))
    true = lm.apply_affine(b, pts)
    mirror = lm.apply_affine(b, np.c_[63 - pts[:, 0], pts[:, 1]])
    cand = np.stack([true, mirror, rng.uniform(0, 63, (m, 2))], 1)[:, :k]
    score = np.tile([0.9, 0.8, 0.5][:k], (m, 1))
    cand[:5, [0, 1]] = cand[:5, [1, 0]]
    return pts, b, true, cand, score


def test_robust_affine_ignores_mirror_confusions():
    pts, b, true, cand, score = _mirror_case()
    fit = lm.robust_affine(pts, cand, score, tol=3.0)
    assert fit is not None
    bb, inl = fit
    assert np.allclose(bb, b, atol=1e-6) and inl.all()
    assert lm.robust_affine(pts[:2], cand[:2], score[:2]) is None  # too few landmarks
    # a pure reflection is never accepted, even when every best peak supports it
    refl = np.concatenate([np.diag([-1.0, 1.0]), [[63.0, 0.0]]], 0)
    c2 = lm.apply_affine(refl, pts)[:, None, :]
    assert lm.robust_affine(pts, c2, np.ones((len(pts), 1))) is None


def test_locate_in_maps_consistent_vs_global():
    pts, b, true, cand, score = _mirror_case(m=10)
    ax = torch.arange(64.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    maps = torch.stack([
        sum(s * torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / 3.0) for c, s in zip(cm, sm))
        for cm, sm in zip(cand, score)
    ])
    glob, info = lm.locate_in_maps(maps, pts, search="global")
    assert info["affine"] is None
    assert np.linalg.norm(glob - true, axis=1)[:5].min() > 5  # the mirror peaks win
    cons, info = lm.locate_in_maps(maps, pts, search="consistent", window=3.0, tol=4.0)
    assert info["inliers"].all()
    assert np.abs(cons - true).max() < 0.6  # integer peaks: sub-pixel leaves < 0.5 px
    near = lm.search_near(maps[:1], np.array([[40.0, 40.0]]), window=2.0)
    assert np.linalg.norm(near - [40.0, 40.0]) <= 2.0 + 0.75
    with pytest.raises(ValueError, match="search"):
        lm.locate_in_maps(maps, pts, search="best")


@pytest.mark.parametrize("mode", ["gaussian", "uniform"])
def test_locator_finds_shifted_landmarks(mode):
    e = _smooth_unit_embeddings(d=16, h=48, w=48, seed=1)
    pts = np.array([[20.0, 18.0], [30.0, 27.0], [15.0, 33.0]])
    dx, dy = 3, -2
    target = torch.roll(e, shifts=(dy, dx), dims=(2, 3))
    for search in ("global", "consistent"):
        loc = lm.LandmarkLocator(radii=(1, 3, 6), mode=mode, search=search).fit(e, pts)
        pred = loc.locate(target)
        assert np.abs(pred - (pts + [dx, dy])).max() < 0.5


def test_ncc_map_matches_brute_force_and_locates():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.random((20, 22)))
    patch = img[5:10, 7:12].clone()
    m = lm.ncc_map(img, patch)
    t = (patch - patch.mean()).flatten()
    for (y, x) in [(7, 9), (10, 12), (12, 5)]:
        win = img[y - 2 : y + 3, x - 2 : x + 3].flatten()
        ref = (t * (win - win.mean())).sum() / (t.norm() * (win - win.mean()).norm())
        assert m[y, x].item() == pytest.approx(ref.item(), abs=1e-6)
    assert m[7, 9].item() == pytest.approx(1.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=gen), size=(40, 40),
                           mode="bicubic")[0, 0].numpy()
    shifted = np.roll(smooth, (2, -3), axis=(0, 1))
    # an integer shift: the Gauss-Newton step on the normalised patches lands on it exactly; a fit
    # to the 3 x 3 map (quadratic, the default) is biased by an asymmetric peak (0.21 px on this
    # field; up to ~0.4 px over random fields, which is why the field is seeded)
    pred = lm.ncc_locate(smooth, np.array([[20.0, 20.0]]), shifted, half=5, subpixel="gauss-newton")
    assert np.abs(pred - [[17.0, 22.0]]).max() < 1e-6
    pred = lm.ncc_locate(smooth, np.array([[20.0, 20.0]]), shifted, half=5)
    assert np.abs(pred - [[17.0, 22.0]]).max() < 0.3
    patches = torch.stack([img[5:10, 7:12], img[2:7, 3:8]])
    both = lm.ncc_maps(img, patches)  # one convolution for all patches
    assert torch.allclose(both[0], m) and torch.allclose(both[1], lm.ncc_map(img, patches[1]))


def _shift_field(field: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """out(x, y) = field(x - dx, y - dy), bicubic (a known sub-pixel translation)."""
    h, w = field.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    grid = torch.stack([(2 * (xx - dx) + 1) / w - 1, (2 * (yy - dy) + 1) / h - 1], -1)[None]
    return F.grid_sample(field, grid, mode="bicubic", padding_mode="border", align_corners=False)


def test_gauss_newton_recovers_a_subpixel_shift_of_a_descriptor_field():
    e = F.interpolate(torch.randn(1, 6, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                      size=(40, 40), mode="bicubic")
    e = e / e.norm(dim=1, keepdim=True)  # unit descriptors, as the matchers give
    pts = np.array([[12.0, 15.0], [25.0, 20.0], [18.0, 28.0]])
    protos = lm.sample_bilinear(e, torch.as_tensor(pts))
    dx, dy = 0.37, -0.21
    target = _shift_field(e, dx, dy)
    start = np.round(pts + [dx, dy])
    got = lm.refine_gauss_newton(target, protos, start)
    assert np.abs(got - (pts + [dx, dy])).max() < 0.06
    # every step stays within max_offset of the integer start
    far = lm.refine_gauss_newton(target, protos, start + [3.0, 0.0], max_offset=1.0)
    assert (np.abs(far - (start + [3.0, 0.0])) <= 1.0 + 1e-12).all()
    # through the search: features are required, the map methods refuse to pretend
    maps = torch.einsum("mc,chw->mhw", protos, target[0])
    near = lm.search_near(maps, start, 2.0, "gauss-newton", (target, protos))
    assert np.abs(near - (pts + [dx, dy])).max() < 0.06
    with pytest.raises(ValueError, match="needs features"):
        lm.search_near(maps, start, 2.0, "gauss-newton")
    with pytest.raises(ValueError, match="refine_gauss_newton"):
        lm.subpixel_peak(maps[0], 15, 12, "gauss-newton")


def test_ncc_patch_field_inner_products_are_the_ncc_maps():
    img = F.interpolate(torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
                        size=(24, 21), mode="bicubic")[0, 0]
    field = lm.ncc_patch_field(img, 3)
    assert field.shape == (1, 49, 24, 21)
    pts = np.array([[7.0, 9.0], [14.0, 12.0]])
    ref = lm.ncc_score_maps(img.numpy(), pts, img.numpy(), 3)
    protos = field[0, :, [9, 12], [7, 14]].t()
    got = torch.einsum("mc,chw->mhw", protos, field[0])
    assert torch.allclose(got, ref, atol=1e-6)


def test_ncc_gauss_newton_locates_a_subpixel_shift():
    smooth = F.interpolate(torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)),
                           size=(40, 40), mode="bicubic")
    pts = np.array([[14.0, 15.0], [25.0, 17.0], [20.0, 26.0], [13.0, 25.0]])
    dx, dy = 0.4, 0.3
    target = _shift_field(smooth, dx, dy)[0, 0].numpy()
    gn = lm.ncc_locate(smooth[0, 0].numpy(), pts, target, 5, subpixel="gauss-newton")
    quad = lm.ncc_locate(smooth[0, 0].numpy(), pts, target, 5, subpixel="quadratic")
    err_gn = np.linalg.norm(gn - (pts + [dx, dy]), axis=1).max()
    assert err_gn < 0.08
    assert err_gn < np.linalg.norm(quad - (pts + [dx, dy]), axis=1).max()


def test_rectify_and_two_stage_locate_undo_a_rotation():
    smooth = F.interpolate(torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
                           size=(48, 48), mode="bicubic")[0, 0].numpy()
    ident = np.concatenate([np.eye(2), np.zeros((1, 2))], 0)
    assert np.allclose(lm.rectify(smooth, ident, smooth.shape), smooth, atol=1e-6)
    shift = np.concatenate([np.eye(2), [[2.0, 0.0]]], 0)  # template q -> target q + (2, 0)
    assert np.allclose(lm.rectify(smooth, shift, smooth.shape)[:, :40], smooth[:, 2:42], atol=1e-6)
    # a target rotated by 20 deg about the centre; the points' true positions follow the warp
    b = _affine(20, 1.0, (0.0, 0.0))
    c = np.array([23.5, 23.5])
    b[2] = c - c @ b[:2]
    inv = np.linalg.inv(np.c_[b, [0, 0, 1]])[:, :2]
    target = lm.rectify(smooth, inv, smooth.shape)  # target[p] = smooth[inv(p)]
    pts = np.array([[16.0, 18.0], [30.0, 15.0], [28.0, 31.0], [17.0, 30.0], [24.0, 24.0]])
    true = lm.apply_affine(b, pts)
    fn = lambda img: lm.ncc_score_maps(smooth, pts, img, 6)
    out, info = lm.locate_image(fn, target, pts, smooth.shape, window=3.0)
    assert info["affine"] is not None
    assert np.linalg.norm(out - true, axis=1).max() < 0.5
    # further passes through the refitted affine: no worse here, and the affine moves towards b
    out3, info3 = lm.locate_image(fn, target, pts, smooth.shape, window=3.0, passes=3)
    assert np.linalg.norm(out3 - true, axis=1).max() < 0.5
    assert np.abs(info3["affine"] - b).max() <= np.abs(info["affine"] - b).max() + 0.05
    with pytest.raises(ValueError, match="passes"):
        lm.LandmarkLocator(passes=0)


def test_paired_difference():
    t = np.repeat(np.arange(10), 3)
    a = np.ones(30)
    b = a + 0.5
    r = lm.paired_difference(a, b, t)
    assert r["mean_diff_px"] == pytest.approx(-0.5) and r["ci95_px"] == pytest.approx([-0.5, -0.5])
    assert r["targets_a_better"] == 1.0 and r["n_targets"] == 10
    with pytest.raises(ValueError):
        lm.paired_difference(a, b[:5], t)


def test_load_points_formats_and_errors(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"points": [{"name": "a", "x": 1, "y": 2}, {"name": "b", "x": 3.5, "y": 4}]}))
    names, xy = lm.load_points(f)
    assert names == ["a", "b"] and xy.tolist() == [[1, 2], [3.5, 4]]
    f.write_text(json.dumps({"a": [1, 2]}))
    assert lm.load_points(f)[1].tolist() == [[1, 2]]
    f.write_text(json.dumps([[1, 2], [3, 4]]))
    assert lm.load_points(f)[0] == ["p0", "p1"]
    f.write_text(json.dumps({"points": [{"name": "a", "x": 1}]}))
    with pytest.raises(ValueError, match="expected"):
        lm.load_points(f)
    f.write_text("[]")
    with pytest.raises(ValueError, match="no points"):
        lm.load_points(f)


def test_cli_predict_and_evaluate(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    yy, xx = np.mgrid[0:32, 0:32]
    img = (np.exp(-((xx - 12) ** 2 + (yy - 14) ** 2) / 30.0) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "t.png")
    (tmp_path / "targets").mkdir()
    Image.fromarray(np.roll(img, 2, axis=1)).save(tmp_path / "targets" / "x.png")
    (tmp_path / "p.json").write_text(json.dumps({"blob": [12, 14], "corner": [25, 25]}))
    import argparse

    p = argparse.ArgumentParser()
    lm.add_arguments(p)
    out = tmp_path / "out.json"
    args = p.parse_args(
        ["--checkpoint", str(ck), "--template", str(tmp_path / "t.png"), "--points", str(tmp_path / "p.json"),
         "--targets", str(tmp_path / "targets"), "--out", str(out), "--evaluate", "2", "--radii", "1", "3",
         "--centre-term-steps", "1"]
    )
    assert lm.run(args) == 0
    res = json.loads(out.read_text())
    assert set(res["predictions"]["x.png"]) == {"blob", "corner"}
    methods = [r["method"] for r in res["evaluation"]["rows"]]
    assert methods[:2] == ["LD centre-sensitive", "LD uniform pooling"] and any(m.startswith("NCC") for m in methods)
    assert out.with_suffix(".png").stat().st_size > 0
    assert res["centre_term"]["steps"] == 1
    assert res["search"]["subpixel"] == "gauss-newton"  # the default sub-pixel step
    args.subpixel, args.evaluate, args.centre_term_steps = "quadratic", 0, 0
    assert lm.run(args) == 0
    quad = json.loads(out.read_text())
    assert quad["search"]["subpixel"] == "quadratic" and set(quad["predictions"]["x.png"]) == {"blob", "corner"}
    (tmp_path / "bad.json").write_text(json.dumps({"far": [100, 3]}))
    args.points = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"1 landmark\(s\) outside the template .*t.png \(32x32 px, x in 0..31, y in "
                       r"0..31\): #0 'far' at \(100, 3\)"):
        lm.run(args)


def test_centre_sensitive_loss_prefers_exact_correspondence():
    # embeddings that encode position sharply: the loss is low when p2 <-> q1 match, high when shifted
    h = w = 24
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    freqs = torch.arange(1, 9, dtype=torch.float32) * 0.35
    e = torch.cat([torch.sin(xx * f)[None] for f in freqs] + [torch.cos(yy * f)[None] for f in freqs])[None]
    e = e / e.norm(dim=1, keepdim=True)
    p = torch.tensor([[8.0, 9.0], [12.0, 14.0], [15.0, 7.0]])
    g = torch.Generator().manual_seed(0)
    good = lm.centre_sensitive_loss(e, e, p, p, radius=3, n_random=16, generator=g)
    bad = lm.centre_sensitive_loss(e, e, p, p + torch.tensor([2.0, 0.0]), radius=3, n_random=16, generator=g)
    assert good < bad
    e1 = e.clone().requires_grad_(True)
    lm.centre_sensitive_loss(e1, e, p, p, radius=2, n_random=4, generator=g).backward()
    assert torch.isfinite(e1.grad).all() and e1.grad.abs().sum() > 0


def test_centre_sensitive_training_runs_and_keeps_the_original():
    torch.manual_seed(0)
    net = LDNet(in_channels=1, emb_dim=8, n_clusters=None, widths=(4, 4, 8, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    imgs = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    tuned, hist = lm.train_centre_sensitive(net, imgs, steps=2, batch=2, points_per_image=8, progress=False)
    assert len(hist) == 2 and all(np.isfinite(hist))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    w = "encoder.groups.0.0.0.weight"
    assert not torch.equal(tuned.state_dict()[w], before[w])
    # on_step sees every step; the first k steps of a longer run are exactly a k-step run
    seen = {}
    longer, _ = lm.train_centre_sensitive(net, imgs, steps=3, batch=2, points_per_image=8, progress=False,
                                          on_step=lambda k, m: seen.__setitem__(k, m.state_dict()[w].clone()))
    assert sorted(seen) == [1, 2, 3] and torch.equal(seen[3], longer.state_dict()[w])
    assert torch.equal(seen[2], tuned.state_dict()[w])
    # the variant on pooled descriptors (measured, not used by the demo) trains too
    tuned2, hist2 = lm.train_centre_sensitive(net, imgs, steps=1, batch=2, points_per_image=8, progress=False,
                                              pooling=dict(radii=(1, 2), mode="gaussian"))
    assert np.isfinite(hist2[0]) and not torch.equal(tuned2.state_dict()[w], before[w])


@pytest.mark.parametrize("mode", ["gaussian", "uniform"])
@pytest.mark.parametrize("edge", ["hard", "soft"])
def test_fractional_descriptors_at_integer_centres_equal_the_pooled_field(mode, edge):
    e = _smooth_unit_embeddings(d=6, h=40, w=44, seed=2)
    radii = (0, 1, 2, 4, 8)
    desc = lm.pooled_descriptors(e, radii, mode, 0.7, edge)
    pts = np.array([[20.0, 18.0], [12.0, 25.0], [30.0, 11.0], [0.0, 0.0], [43.0, 39.0]])  # incl. corners
    got = lm.fractional_descriptors(e, pts, radii, mode, 0.7, edge)
    ref = desc[0][:, pts[:, 1].astype(int), pts[:, 0].astype(int)].t()
    assert got.shape == (5, 6 * len(radii))
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(got.norm(dim=1), torch.ones(5, dtype=torch.float64))
    # the soft kernel differs from the hard one only on the rim
    kh = lm.pooling_kernel(4, mode, torch.float64, edge="hard")
    ks = lm.pooling_kernel(4, mode, torch.float64, edge=edge)
    assert torch.equal(ks > 0, (ks > 0) | (kh > 0)) and ks.sum().item() == pytest.approx(1.0)


def test_fractional_descriptors_are_continuous_with_soft_edges():
    e = _smooth_unit_embeddings(d=6, h=40, w=40, seed=3)
    xs = np.linspace(20.0, 21.0, 41)
    pts = np.stack([xs, np.full_like(xs, 18.3)], 1)
    steps = {}
    for mode in ("gaussian", "uniform"):
        for edge in ("hard", "soft"):
            f = lm.fractional_descriptors(e, pts, (4,), mode, 0.7, edge)
            steps[mode, edge] = (f[1:] - f[:-1]).norm(dim=1).max().item()
    # a hard uniform disc jumps when pixels enter or leave it; the soft-edged windows move smoothly
    assert steps["uniform", "soft"] < 0.5 * steps["uniform", "hard"]
    assert steps["gaussian", "soft"] < 0.5 * steps["gaussian", "hard"]
    # radius 0 is the bilinear interpolation of the embeddings
    r0 = lm.fractional_descriptors(e, pts[:3], (0,))
    b = lm.sample_bilinear(e, torch.as_tensor(pts[:3]))
    assert torch.allclose(r0, b / b.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("radii", [(), (1, -2), (1.5,), (True,), 3])
def test_every_pooling_entry_point_rejects_bad_radii(radii):
    e = _smooth_unit_embeddings(d=4, h=20, w=20)
    pts = np.array([[5.5, 6.25]])
    calls = [
        lambda: lm.pooled_descriptors(e, radii=radii),
        lambda: lm.fractional_descriptors(e, pts, radii=radii),
        lambda: lm.FractionalSampler(e, radii=radii),
        lambda: lm.LandmarkLocator(radii=radii),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="radii"):
            call()


def test_fractional_descriptors_and_sampler_argument_errors():
    e = _smooth_unit_embeddings(d=4, h=20, w=20)
    pts = np.array([[5.5, 6.25]])
    with pytest.raises(ValueError, match="mode"):
        lm.fractional_descriptors(e, pts, mode="box")
    with pytest.raises(ValueError, match="edge"):
        lm.fractional_descriptors(e, pts, edge="fuzzy")
    with pytest.raises(ValueError, match="sigma_frac"):
        lm.fractional_descriptors(e, pts, sigma_frac=0.0)
    with pytest.raises(ValueError, match="radii"):
        lm.fractional_descriptors(e, pts, radii=())
    with pytest.raises(ValueError, match="radii"):
        lm.fractional_descriptors(e, pts, radii=(1, -2))
    with pytest.raises(ValueError, match="radii"):
        lm.fractional_descriptors(e, pts, radii=(1.5,))
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        lm.fractional_descriptors(e, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        lm.fractional_descriptors(e, np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"\(1, D, H, W\)"):
        lm.fractional_descriptors(e[0], pts)
    with pytest.raises(ValueError, match="step"):
        lm.FractionalSampler(e, step=0)
    with pytest.raises(ValueError, match="fractional"):
        lm.LandmarkLocator(fractional="nearest")
    with pytest.raises(ValueError, match="edge"):
        lm.LandmarkLocator(edge="round")
    with pytest.raises(ValueError, match="jac_step"):
        lm.LandmarkLocator(jac_step=-1.0)


@pytest.mark.parametrize("mode,edge", [("gaussian", "hard"), ("gaussian", "soft"), ("uniform", "soft")])
def test_exact_fractional_locator_recovers_a_subpixel_shift(mode, edge):
    e = _smooth_unit_embeddings(d=8, h=48, w=48, seed=4)
    e = F.interpolate(e, scale_factor=0.5, mode="bilinear")  # smoother, so a sub-pixel shift is well posed
    e = F.interpolate(e, size=(48, 48), mode="bicubic")
    e = e / e.norm(dim=1, keepdim=True)
    pts = np.array([[20.0, 18.0], [30.0, 27.0], [15.0, 33.0], [27.0, 14.0]])
    dx, dy = 0.4, -0.3
    target = _shift_field(e, dx, dy)
    target = target / target.norm(dim=1, keepdim=True)
    loc = lm.LandmarkLocator(radii=(0, 1, 2, 4), mode=mode, edge=edge, fractional="exact").fit(e, pts)
    assert torch.allclose(loc.protos, lm.fractional_descriptors(e, pts, (0, 1, 2, 4), mode, edge=edge))
    pred = loc.locate(target)
    assert np.abs(pred - (pts + [dx, dy])).max() < 0.15
    if edge == "hard":
        return  # pixels enter and leave the disc: the descriptor has jumps, no derivative there
    # the sampler's Jacobian is the derivative of the (continuous) descriptor
    s = lm.FractionalSampler(target, (0, 1, 2, 4), mode, edge=edge, step=1e-4)
    p = torch.as_tensor(pts + 0.3)
    jac = s.jacobian(p)
    fd = (s(p + torch.tensor([0.05, 0.0], dtype=torch.float64)) - s(p - torch.tensor([0.05, 0.0], dtype=torch.float64))) / 0.1
    assert torch.allclose(jac[..., 0], fd, atol=0.05)


def test_cli_predictions_are_in_each_targets_own_pixels(tmp_path, monkeypatch):
    """With --size the search runs in the resized frame; the file gives each target's own pixels."""
    import argparse

    from PIL import Image

    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "targets").mkdir()
    Image.fromarray((rng.random((32, 48)) * 255).astype(np.uint8)).save(tmp_path / "targets" / "wide.png")  # 48 wide, 32 high
    Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / "targets" / "small.png")
    (tmp_path / "p.json").write_text(json.dumps({"a": [10, 12]}))
    # the locator answers in the 64x64 frame it searched: the pixel-centre point (31.5, 15.5)
    monkeypatch.setattr(
        lm.LandmarkLocator,
        "locate_image",
        lambda self, model, img, return_info=False: (np.array([[31.5, 15.5]]), {"scores": np.array([0.5])}),
    )
    p = argparse.ArgumentParser()
    lm.add_arguments(p)
    out = tmp_path / "out.json"
    args = p.parse_args(["--checkpoint", str(ck), "--template", str(tmp_path / "t.png"), "--points",
                         str(tmp_path / "p.json"), "--targets", str(tmp_path / "targets"), "--out", str(out), "--size", "64"])
    assert lm.run(args) == 0
    res = json.loads(out.read_text())
    # x' = (x + 0.5) * own_w / 64 - 0.5, y' = (y + 0.5) * own_h / 64 - 0.5
    assert res["predictions"]["wide.png"]["a"] == pytest.approx([32 * 48 / 64 - 0.5, 16 * 32 / 64 - 0.5])
    assert res["predictions"]["small.png"]["a"] == pytest.approx([32 * 16 / 64 - 0.5, 16 * 16 / 64 - 0.5])
    assert res["target_sizes"] == {"wide.png": [48, 32], "small.png": [16, 16]}
    assert "own pixels" in res["frame"]


def test_flag_predictions_outside_border_and_far():
    from ld_ext.tasks.landmarks import report

    tp = np.array([[10.0, 10.0], [20.0, 25.0], [0.0, 5.0], [10.0, 10.0], [15.0, 15.0]])
    p = np.array([[11.0, 9.0], [20.0, 31.2], [0.0, 5.0], [-1.0, 10.0], [30.0, 30.0]])
    f = report.flag_predictions(p, (32, 32), tp, (32, 32))
    assert f[0] == [] and f[2] == []  # near its template place; on the border where the template's is too
    assert f[1] == ["on the image border"]
    assert f[3] == ["outside the image"]
    assert f[4] == ["far from where the template puts it (47% of the image diagonal)"]
    # the template position is carried to the target's size by its relative place
    assert report.flag_predictions(np.array([[40.0, 20.0]]), (64, 128), np.array([[10.0, 10.0]]), (32, 32)) == [[]]


def test_cli_targets_table_figure_of_every_target_and_warnings(tmp_path, monkeypatch, capsys, caplog):
    """--targets: a table of every target and landmark, a figure with a panel per target, numbered
    landmarks and a legend of their names, and a warning naming each implausible prediction."""
    import argparse

    from PIL import Image

    from ld_ext.tasks.landmarks import report

    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "targets").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "targets" / name)
    (tmp_path / "p.json").write_text(json.dumps({"apex": [10, 12], "base": [28, 22]}))
    answers = iter([[[10.2, 12.1], [20.0, 22.3]], [[10.0, 12.0], [33.0, 22.0]], [[9.0, 12.0], [21.0, 21.0]]])
    monkeypatch.setattr(
        lm.LandmarkLocator,
        "locate_image",
        lambda self, model, img, return_info=False: (np.array(next(answers)), {"scores": np.array([0.9, 0.25])}),
    )
    figs = []
    monkeypatch.setattr(report.common, "atomic_savefig", lambda fig, path: figs.append(fig))
    p = argparse.ArgumentParser()
    lm.add_arguments(p)
    out = tmp_path / "out.json"
    args = p.parse_args(["--checkpoint", str(ck), "--template", str(tmp_path / "t.png"), "--points",
                         str(tmp_path / "p.json"), "--targets", str(tmp_path / "targets"), "--out", str(out)])
    with caplog.at_level("WARNING", logger="ld_ext"):
        assert lm.run(args) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split() == ["target", "#", "landmark", "x", "y", "score", "flag"]
    assert lines[1].split() == ["a.png", "0", "apex", "10.2", "12.1", "0.900"]
    assert lines[2].split() == ["1", "base", "20.0", "22.3", "0.250"]
    assert lines[4].split()[:6] == ["1", "base", "33.0", "22.0", "0.250", "outside"]
    assert lines[5].split()[0] == "c.png" and f"wrote {out} and {out.with_suffix('.png')}" in printed
    assert "target b.png, landmark #1 'base' at (33.0, 22.0) in its 32x32 px: outside the image" in caplog.text
    assert "a.png" not in caplog.text and "c.png" not in caplog.text
    res = json.loads(out.read_text())
    assert res["flags"] == {"b.png": {"base": ["outside the image"]}}
    assert res["scores"]["c.png"] == {"apex": 0.9, "base": 0.25}
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["template t.png (annotated)", "a.png", "b.png (1 flagged)", "c.png"]
    assert all(len(ax.texts) == 2 for ax in panels)  # every landmark numbered in every panel
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["0: apex", "1: base", "implausible (warned)"]


# ----------------------------------------------------------------------------- stage 3 of ld-ext pretrain


def _stage_cfg(out, **kw):
    from ld_ext import train

    base = dict(out=str(out), size=32, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8), batch_size=2, epochs1=1,
                epochs2=1, steps_per_epoch=1, val_images=0, progress=False, seed=3, device="cpu", centre_steps=2)
    base.update(kw)
    return train.TrainConfig(**base)


def test_pretrain_stage3_runs_is_saved_and_resume_skips_it(tmp_path, monkeypatch):
    from ld_ext import train
    from ld_ext.bench import synthetic_images
    from ld_ext.checkpoint import load_checkpoint, load_model
    from ld_ext.data import ImageFolderDataset
    from ld_ext.tasks.landmarks import pretrain_stage

    ds = ImageFolderDataset.from_tensor(synthetic_images(6, 32, seed=4))
    out = tmp_path / "run"
    res = train.pretrain(_stage_cfg(out), dataset=ds)
    ck = load_checkpoint(out / "model.pt")
    # model.pt records the run's settings: the tasks resize to its size by default
    from ld_ext.tasks.common import checkpoint_train_size

    assert ck["train_config"]["size"] == 32 and checkpoint_train_size(out / "model.pt") == 32
    rec = lm.centre_term_record(ck)
    assert rec["steps"] == 2 and rec["seed"] == 3 and rec["images"] == 6
    assert np.isfinite(rec["loss_first"]) and np.isfinite(rec["loss_last"])
    assert lm.centre_term_record(load_checkpoint(out / pretrain_stage.STAGE3_FILE))["steps"] == 2
    s2 = load_model(out / "stage2.pt").state_dict()
    rep = load_model(out / "model.pt").state_dict()  # the representation: stage 2, untouched by stage 3
    s3 = load_model(out / "model.pt", part="landmark").state_dict()
    assert s2.keys() == rep.keys() == s3.keys()
    assert all(torch.equal(s2[k], rep[k]) for k in s2)
    w = "encoder.groups.0.0.0.weight"
    assert not torch.equal(s2[w], s3[w])  # stage 3 trained a copy of the network after stage 2
    assert all(torch.equal(s3[k], v) for k, v in load_model(out / "stage3.pt").state_dict().items())
    assert torch.equal(res["final_model"].state_dict()[w], s2[w])
    assert torch.equal(res["landmark_model"].state_dict()[w], s3[w])
    from ld_ext.checkpoint import checkpoint_parts

    assert checkpoint_parts(ck) == {"representation": True, "landmark": True, "legacy_stage3": False}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2, 3] and records[2]["steps"] == 2
    # without stage 3 the checkpoint says so
    train.pretrain(_stage_cfg(tmp_path / "plain", centre_steps=0), dataset=ds)
    assert lm.centre_term_record(load_checkpoint(tmp_path / "plain" / "model.pt")) is None
    assert not (tmp_path / "plain" / "stage3.pt").exists()
    plain = load_checkpoint(tmp_path / "plain" / "model.pt")
    assert checkpoint_parts(plain) == {"representation": True, "landmark": False, "legacy_stage3": False}
    # no landmark network in the file: part="landmark" falls back to the representation
    a = load_model(tmp_path / "plain" / "model.pt", part="landmark").state_dict()
    assert all(torch.equal(v, plain["model"][k]) for k, v in a.items())

    # resume: stages 1-2 are not redone, stage 3 is loaded, not trained again
    calls = {"steps": 0, "stage3": 0}
    real = pretrain_stage.train_centre_sensitive

    def counting(*a, **k):
        calls["stage3"] += 1
        return real(*a, **k)

    monkeypatch.setattr(pretrain_stage, "train_centre_sensitive", counting)
    hook = lambda info: calls.__setitem__("steps", calls["steps"] + 1)  # noqa: E731
    again = train.pretrain(_stage_cfg(out, resume=True), dataset=ds, on_step_end=hook)
    assert calls == {"steps": 0, "stage3": 0}
    assert torch.equal(again["final_model"].state_dict()[w], s2[w])
    assert torch.equal(again["landmark_model"].state_dict()[w], s3[w])
    assert lm.centre_term_record(load_checkpoint(out / "model.pt")) == rec
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2, 3]
    # a resumed run asking for another length redoes stage 3 from the stage-2 weights only
    train.pretrain(_stage_cfg(out, resume=True, centre_steps=3), dataset=ds, on_step_end=hook)
    assert calls == {"steps": 0, "stage3": 1}
    assert lm.centre_term_record(load_checkpoint(out / "model.pt"))["steps"] == 3
    with pytest.raises(ValueError, match="centre_steps"):
        _stage_cfg(out, centre_steps=-1).validate()


def test_centre_term_record_validates():
    assert lm.centre_term_record({"model": {}}) is None
    assert lm.centre_term_record({"centre_term": {"steps": 5}}) == {"steps": 5}
    for bad in ({"steps": "5"}, {"steps": True}, [5], {"loss": 1.0}):
        with pytest.raises(ValueError, match="centre_term"):
            lm.centre_term_record({"centre_term": bad})
    good = {"steps": 2, "seed": 3, "images": 6, "loss_first": 1.0, "loss_last": 1, "seconds": 0.1}
    assert lm.centre_term_record({"centre_term": good}) == good
    for key, value in [("loss_first", torch.tensor(1.0)), ("loss_last", "low"), ("seconds", float("nan")),
                       ("images", 6.0), ("seed", None), ("loss_first", True)]:
        with pytest.raises(ValueError, match=f"'centre_term' entry '{key}' must be a finite"):
            lm.centre_term_record({"centre_term": dict(good, **{key: value})})


def test_cli_landmark_reports_whether_the_checkpoint_carries_the_term(tmp_path, caplog):
    import argparse
    import logging

    from PIL import Image

    torch.manual_seed(0)
    net = LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8))
    plain, term = tmp_path / "plain.pt", tmp_path / "term.pt"
    save_checkpoint(plain, net)
    save_checkpoint(term, {"config": net.config, "model": net.state_dict(), "centre_term": {"steps": 7, "seed": 0}})
    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray((np.exp(-((xx - 12) ** 2 + (yy - 14) ** 2) / 30.0) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "targets").mkdir()
    Image.open(tmp_path / "t.png").save(tmp_path / "targets" / "x.png")
    (tmp_path / "p.json").write_text(json.dumps({"blob": [12, 14], "b": [20, 9], "c": [8, 22]}))
    p = argparse.ArgumentParser()
    lm.add_arguments(p)
    out = tmp_path / "out.json"
    for ck, expect in ((term, {"steps": 7, "seed": 0}), (plain, None)):
        caplog.clear()
        args = p.parse_args(["--checkpoint", str(ck), "--template", str(tmp_path / "t.png"), "--points",
                             str(tmp_path / "p.json"), "--targets", str(tmp_path / "targets"), "--out", str(out)])
        with caplog.at_level(logging.WARNING, logger="ld_ext"):
            assert lm.run(args) == 0
        assert json.loads(out.read_text())["checkpoint_centre_term"] == expect
        warned = any("no centre-sensitive term" in r.getMessage() for r in caplog.records)
        assert warned == (expect is None)


def test_two_part_checkpoint_each_task_reads_its_network(tmp_path, caplog):
    """model.pt of ld-ext pretrain with stage 3: "model" is the representation (stage 2) that the
    segmentation, probe and shape-guided tasks read; "landmark_model" is what ld-ext landmark reads.
    Each load says in one log line which network it read."""
    import logging

    from ld_ext.checkpoint import LANDMARK_KEY, load_checkpoint
    from ld_ext.tasks import common

    torch.manual_seed(0)
    rep = LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8))
    lmk = LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8))
    both, legacy = tmp_path / "model.pt", tmp_path / "legacy.pt"
    save_checkpoint(both, {"config": rep.config, "model": rep.state_dict(), "centre_term": {"steps": 7, "seed": 0},
                           LANDMARK_KEY: lmk.state_dict()})
    save_checkpoint(legacy, {"config": lmk.config, "model": lmk.state_dict(), "centre_term": {"steps": 7, "seed": 0}})
    cases = [(both, "representation", rep, "reading the representation network"),
             (both, "landmark", lmk, "reading the landmark network"),
             (legacy, "representation", lmk, "representation before stage 3 is stage2.pt"),
             (legacy, "landmark", lmk, "the landmark task reads them as they are")]
    for path, part, expect, said in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ld_ext"):
            got = common.load_ld_model(path, part=part).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expect.state_dict().items()), (path.name, part)
        assert any(said in r.getMessage() for r in caplog.records), (path.name, part, caplog.text)
    with pytest.raises(ValueError, match="part must be one of"):
        common.load_ld_model(both, part="body")
    # a landmark network of another architecture than the config is refused with the file named
    other = LDNet(in_channels=1, emb_dim=4, n_clusters=4, widths=(4, 4, 8, 8, 8))
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {**load_checkpoint(both), LANDMARK_KEY: other.state_dict()})
    with pytest.raises(ValueError, match="bad.pt"):
        common.load_ld_model(bad, part="landmark")
    # a landmark entry that is not a state dict
    save_checkpoint(bad, {**load_checkpoint(both), LANDMARK_KEY: [1, 2]})
    with pytest.raises(ValueError, match="'landmark_model' entry is not a state dict"):
        common.load_ld_model(bad, part="landmark")


def test_stage3_file_of_another_network_is_trained_again_not_a_traceback(tmp_path, caplog):
    import logging

    from ld_ext import train
    from ld_ext.bench import synthetic_images
    from ld_ext.data import ImageFolderDataset
    from ld_ext.tasks.landmarks import pretrain_stage

    ds = ImageFolderDataset.from_tensor(synthetic_images(6, 32, seed=4))
    out = tmp_path / "run"
    train.pretrain(_stage_cfg(out), dataset=ds)
    other = LDNet(in_channels=1, emb_dim=4, n_clusters=4, widths=(4, 4, 8, 8, 8))
    rec = {"steps": 2, "seed": 3, "images": 6, "loss_first": 1.0, "loss_last": 1.0, "seconds": 0.1}
    save_checkpoint(out / pretrain_stage.STAGE3_FILE, {"config": other.config, "model": other.state_dict(),
                                                        "stage": 3, "centre_term": rec})
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        res = train.pretrain(_stage_cfg(out, resume=True), dataset=ds)
    assert any("does not fit this network" in r.getMessage() for r in caplog.records), caplog.text
    assert res["landmark_model"] is not None and res["landmark_model"].emb_dim == 8


def test_cli_figure_of_an_earlier_run_in_the_targets_folder_is_not_a_target(tmp_path, monkeypatch):
    """--out inside --targets: the run's own figure (OUT.png, left by an earlier run) is never
    located as a target."""
    import argparse

    from PIL import Image

    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    targets = tmp_path / "targets"
    targets.mkdir()
    for name in ("a.png", "b.png", "out.png"):  # out.png: the figure of an earlier run
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(targets / name)
    (tmp_path / "p.json").write_text(json.dumps({"apex": [10, 12]}))
    seen = []

    def locate(self, model, img, return_info=False):
        seen.append(img)
        return np.array([[10.0, 12.0]]), {"scores": np.array([0.9])}

    monkeypatch.setattr(lm.LandmarkLocator, "locate_image", locate)
    p = argparse.ArgumentParser()
    lm.add_arguments(p)
    out = targets / "out.json"
    args = p.parse_args(["--checkpoint", str(ck), "--template", str(tmp_path / "t.png"), "--points",
                         str(tmp_path / "p.json"), "--targets", str(targets), "--out", str(out)])
    assert lm.run(args) == 0
    assert len(seen) == 2
    assert sorted(json.loads(out.read_text())["scores"]) == ["a.png", "b.png"]


def test_stage3_file_with_a_damaged_record_is_trained_again_on_resume(tmp_path, caplog):
    """A stage3.pt whose centre-term record holds a tensor loss (valid otherwise) was a traceback
    (JSON) on --resume: now a warning and stage 3 again."""
    import logging

    from ld_ext import train
    from ld_ext.bench import synthetic_images
    from ld_ext.data import ImageFolderDataset
    from ld_ext.tasks.landmarks import pretrain_stage

    ds = ImageFolderDataset.from_tensor(synthetic_images(6, 32, seed=4))
    out = tmp_path / "run"
    train.pretrain(_stage_cfg(out), dataset=ds)
    st = torch.load(out / pretrain_stage.STAGE3_FILE, weights_only=True)
    st["centre_term"]["loss_first"] = torch.tensor(1.0)
    save_checkpoint(out / pretrain_stage.STAGE3_FILE, st)
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        res = train.pretrain(_stage_cfg(out, resume=True), dataset=ds)
    assert any("'loss_first' must be a finite number" in r.getMessage() and "trained again" in r.getMessage()
               for r in caplog.records), caplog.text
    assert isinstance(res["landmark_model"], LDNet)
    assert isinstance(lm.centre_term_record(torch.load(out / "model.pt", weights_only=True))["loss_first"], float)
