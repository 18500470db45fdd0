"""Tests of ld_ext.tasks.shape_guided: discriminator, prior augmentation, training step, evaluation."""
import argparse
import json

import numpy as np
import pytest
import torch

from ld_ext.checkpoint import save_checkpoint
from ld_ext.models import LDNet
from ld_ext.tasks import shape_guided as sg


def test_discriminator_shapes_and_checks():
    d = sg.ShapeDiscriminator()
    assert d(torch.rand(3, 1, 64, 64)).shape == (3,)
    assert d(torch.rand(2, 1, 160, 160)).shape == (2,)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        d(torch.rand(2, 3, 64, 64))


def test_prior_augmentation_is_binary_and_keeps_area_roughly():
    pri = torch.zeros(2, 32, 32)
    pri[:, 8:24, 8:24] = 1
    out = sg.augment_priors(pri, 6, 32, torch.Generator().manual_seed(0))
    assert out.shape == (6, 1, 32, 32)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    area = out.flatten(1).sum(1) / 256
    assert ((area > 0.7) & (area < 1.6)).all()


def test_evaluate_clusters_and_soft_segmentation():
    masks = np.zeros((2, 8, 8), bool)
    masks[:, :4] = True
    a = np.zeros((2, 3, 8, 8))
    a[:, 0] = masks
    a[:, 1] = ~masks
    r = sg.evaluate_clusters(a, a, masks)
    assert r["a"][0] == 1.0 and r["a"][1] == 0.0
    torch.manual_seed(0)
    model = LDNet(in_channels=1, emb_dim=8, n_clusters=3, widths=(4, 4, 8, 8, 8))
    aa, S = sg.soft_segmentation(model, np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    assert aa.shape == S.shape == (2, 3, 32, 32)
    assert np.allclose(S.sum(1), 1.0, atol=1e-5) and np.allclose(aa.sum(1), 1.0, atol=1e-5)


def test_guided_training_updates_discriminator_and_reports_terms():
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32)).astype(np.float32)
    priors = np.zeros((3, 32, 32), bool)
    priors[:, 10:20, 8:25] = True
    model, hist = sg.train_shape_guided(images, priors, n_clusters=3, steps=2, batch=1, progress=False)
    assert {"adv_g", "adv_d", "rd", "pd"} <= set(hist[-1])
    assert all(np.isfinite(v) for h in hist for v in h.values())
    _, hist_plain = sg.train_shape_guided(images, None, n_clusters=3, steps=1, batch=1, progress=False)
    assert "adv_g" not in hist_plain[0]


def test_cli_with_masks(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[0:32, 0:32]
    for name in ("images", "masks", "priors"):
        (tmp_path / name).mkdir()
    for i in range(3):
        m = (xx - 14 - i) ** 2 + (yy - 16) ** 2 < 40
        Image.fromarray((m * 200 + 30).astype(np.uint8)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
        Image.fromarray(((np.abs(xx - 16) < 6 + i) * 255).astype(np.uint8)).save(tmp_path / "priors" / f"p{i}.png")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ld.pt", LDNet(in_channels=1, emb_dim=8, n_clusters=6, widths=(4, 4, 8, 8, 8)))
    p = argparse.ArgumentParser()
    sg.add_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args(
        ["--images", str(tmp_path / "images"), "--priors", str(tmp_path / "priors"), "--masks", str(tmp_path / "masks"),
         "--out", str(out), "--size", "32", "--steps", "1", "--batch", "1", "--clusters", "3",
         "--checkpoint", str(tmp_path / "ld.pt")]
    )
    assert sg.run(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["dice"]["guided_cluster0_S"] <= 1.0 and 0 <= res["dice"]["plain_best_S_cluster"] < 3
    assert (out / "shape_guided.png").stat().st_size > 0 and (out / "shape_guided.pt").exists()
    args.clusters = 1
    with pytest.raises(ValueError, match="--clusters must be >= 2"):
        sg.run(args)


def test_init_keeps_the_checkpoint_clustering_branch_unless_clusters_given(tmp_path):
    torch.manual_seed(0)
    net = LDNet(in_channels=1, emb_dim=8, n_clusters=5, widths=(4, 4, 8, 8, 8))
    save_checkpoint(tmp_path / "ld.pt", net)
    kept = sg._init_model(tmp_path / "ld.pt", None, seed=0)
    assert kept.n_clusters == 5
    for (k, v), (k2, v2) in zip(net.state_dict().items(), kept.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    fresh = sg._init_model(tmp_path / "ld.pt", 3, seed=0)
    assert fresh.n_clusters == 3
    enc = {k: v for k, v in net.state_dict().items() if k.startswith("encoder")}
    assert enc and all(torch.equal(fresh.state_dict()[k], v) for k, v in enc.items())
    save_checkpoint(tmp_path / "s1.pt", LDNet(in_channels=1, emb_dim=8, n_clusters=None, widths=(4, 4, 8, 8, 8)))
    with pytest.raises(ValueError, match="no clustering branch"):
        sg._init_model(tmp_path / "s1.pt", None, seed=0)
    assert sg._init_model(tmp_path / "s1.pt", 4, seed=0).n_clusters == 4
    assert sg._init_model(None, None, seed=0).n_clusters == sg.DEFAULT_CLUSTERS


def test_restarts_keep_the_lowest_adversarial_loss_and_report_all():
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32)).astype(np.float32)
    masks = images > 0.5
    priors = np.zeros((2, 32, 32), bool)
    priors[:, 8:24, 10:22] = True
    res = sg.shape_guided_experiment(
        images, priors, masks, n_clusters=3, steps=2, batch=1, seed=5, progress=False, restarts=2,
        d_lr_factor=1.0, d_spectral_norm=True,
    )
    seeds = [r["seed"] for r in res["restarts"]]
    assert seeds == [5, 6]
    losses = {r["seed"]: r["final_adv_g"] for r in res["restarts"]}
    assert res["chosen_seed"] == min(losses, key=losses.get)
    assert all(0.0 <= r["dice_cluster0_a"] <= 1.0 for r in res["restarts"])
    md = sg.results_markdown(res)
    assert "(kept)" in md and md.count("\n| 5") + md.count("\n| 6") == 2


def test_final_adversarial_loss_averages_the_tail_and_needs_the_term():
    hist = [{"adv_g": float(i)} for i in range(20)]
    assert sg.final_adversarial_loss(hist, tail=4) == pytest.approx(17.5)
    with pytest.raises(ValueError, match="no adversarial term"):
        sg.final_adversarial_loss([{"pd": 1.0}])


def test_spectral_norm_discriminator_bounds_each_layer():
    torch.manual_seed(0)
    d = sg.ShapeDiscriminator(spectral_norm=True)
    x = torch.rand(2, 1, 160, 160)
    for _ in range(3):  # power iterations settle in training mode
        d(x)
    d.eval()
    convs = [m for m in d.net if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9
    for m in convs:
        w = m.weight.flatten(1)
        assert torch.linalg.matrix_norm(w, ord=2) <= 1.0 + 0.2
