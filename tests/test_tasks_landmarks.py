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


@pytest.mark.parametrize("mode", ["gaussian", "uniform"])
def test_locator_finds_shifted_landmarks(mode):
    e = _smooth_unit_embeddings(d=16, h=48, w=48, seed=1)
    pts = np.array([[20.0, 18.0], [30.0, 27.0], [15.0, 33.0]])
    dx, dy = 3, -2
    target = torch.roll(e, shifts=(dy, dx), dims=(2, 3))
    loc = lm.LandmarkLocator(radii=(1, 3, 6), mode=mode, stride=4).fit(e, pts)
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
    smooth = F.interpolate(torch.rand(1, 1, 8, 8, dtype=torch.float64), size=(40, 40), mode="bicubic")[0, 0].numpy()
    shifted = np.roll(smooth, (2, -3), axis=(0, 1))
    pred = lm.ncc_locate(smooth, np.array([[20.0, 20.0]]), shifted, half=5)
    assert np.abs(pred - [[17.0, 22.0]]).max() < 0.3


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
    (tmp_path / "bad.json").write_text(json.dumps({"far": [100, 3]}))
    args.points = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="inside the template"):
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
