"""Tests of ld_ext.tasks.segmentation: split, LD vs random initialisation, CLI outputs and errors."""
import argparse
import json

import numpy as np
import pytest
import torch

from ld_ext.checkpoint import save_checkpoint
from ld_ext.models import LDNet
from ld_ext.tasks import segmentation as seg

TINY = dict(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8))


def _write_pairs(tmp_path, n=6, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        cx, cy = rng.uniform(10, 22, 2)
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < 36
        img = np.clip(m * 180 + rng.normal(40, 10, m.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / "masks" / f"s{i}_mask.png")


def test_split_is_disjoint_and_checked():
    test, trains = seg.split_indices(10, 3, 4, 0.5)
    assert len(test) == 5 and len(trains) == 4
    for t in trains:
        assert len(t) == 3 and not set(t) & set(test)
    with pytest.raises(ValueError, match="shots=6"):
        seg.split_indices(10, 6, 1, 0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        seg.split_indices(10, 2, 1, 1.0)


def test_split_draws_shots_among_non_empty_masks():
    fg = np.array([True, False, True, False, True, False, True, False, True, False])
    test, trains = seg.split_indices(10, 2, 6, 0.5, has_foreground=fg)
    for t in trains:
        assert fg[t].all() and not set(t) & set(test)
    n_pool = int(fg[np.setdiff1d(np.arange(10), test)].sum())
    with pytest.raises(ValueError, match=f"only {n_pool} labelled pairs with a non-empty mask"):
        seg.split_indices(10, n_pool + 1, 1, 0.5, has_foreground=fg)
    with pytest.raises(ValueError, match="has_foreground"):
        seg.split_indices(10, 1, 1, 0.5, has_foreground=fg[:3])


def test_experiment_skips_empty_masks_or_warns(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ld.pt", LDNet(**TINY))
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([((xx - 16) ** 2 + (yy - 16) ** 2 < 30) & (i % 2 == 0) for i in range(10)])
    images = (masks * 0.7 + 0.2).astype(np.float32)
    r = seg.transfer_experiment(images, masks, tmp_path / "ld.pt", shots=2, seeds=2, steps=1, progress=False)
    for t in r["train_indices"]:
        assert masks[t].any(axis=(1, 2)).all()
    with pytest.warns(UserWarning, match="training masks are empty"):
        r = seg.transfer_experiment(images, masks, tmp_path / "ld.pt", shots=4, seeds=3, steps=1, progress=False,
                                    include_empty=True)
    assert any(not masks[t].any(axis=(1, 2)).all() for t in r["train_indices"])


def test_decoder_head_and_frozen_body():
    torch.manual_seed(0)
    net = seg.build_segnet(None, config=TINY, seed=0, head="decoder")
    assert net.head.in_channels == net.body.decoder.out_channels
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    before = {k: v.clone() for k, v in net.body.state_dict().items()}
    head_before = net.head.weight.clone()
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([(xx - 16) ** 2 + (yy - 16) ** 2 < 50] * 3)
    seg.train_segnet(net, (masks * 0.8 + 0.1).astype(np.float32), masks, steps=3, freeze_steps=3)
    for k, v in net.body.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, before[k]), k
    assert not torch.equal(net.head.weight, head_before)
    seg.train_segnet(net, (masks * 0.8 + 0.1).astype(np.float32), masks, steps=2, freeze_steps=1, body_lr_factor=0.5)
    assert any(not torch.equal(v, before[k]) for k, v in net.body.state_dict().items())
    with pytest.raises(ValueError, match="head"):
        seg.build_segnet(None, config=TINY, head="logits")
    with pytest.raises(ValueError, match="body_lr_factor"):
        seg.train_segnet(net, masks.astype(np.float32), masks, steps=1, body_lr_factor=-1.0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_warmup_scales_the_first_steps_learning_rates(warmup):
    # Adam's first step moves each weight with a nonzero gradient by lr * g / (|g| + eps), about lr:
    # with warmup N the first step runs at lr / (N + 1), for the head and for the body alike.
    torch.manual_seed(0)
    net = seg.build_segnet(None, config=TINY, seed=0)
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([(xx - 16) ** 2 + (yy - 16) ** 2 < 50] * 3)
    head0 = net.head.weight.detach().clone()
    conv = next(m for m in net.body.modules() if isinstance(m, torch.nn.Conv2d))
    body0 = conv.weight.detach().clone()
    lr = 1e-2
    seg.train_segnet(net, (masks * 0.8 + 0.1).astype(np.float32), masks, steps=1, lr=lr, warmup_steps=warmup)
    expected = lr / (warmup + 1)
    for before, after in ((head0, net.head.weight), (body0, conv.weight)):
        moved = (after.detach() - before).abs().max().item()
        assert moved == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        seg.train_segnet(net, masks.astype(np.float32), masks, steps=1, warmup_steps=-1)


def test_finetune_cli_rejects_negative_warmup(tmp_path):
    args = argparse.Namespace(
        shots=1, seeds=1, steps=1, size=None, lr=1e-3, batch=1, freeze_steps=0, warmup_steps=-2, body_lr_factor=1.0
    )
    with pytest.raises(ValueError, match="--warmup-steps"):
        seg.run(args)


@pytest.mark.parametrize("dims", [2, 3])
def test_hypercolumn_head_reads_z_decoder_and_upsampled_encoder_levels(dims):
    cfg = dict(TINY, spatial_dims=dims)
    net = seg.build_segnet(None, config=cfg, seed=0, head="hypercolumn").eval()
    body = net.body
    assert net.head.in_channels == body.emb_dim + body.decoder.out_channels + sum(body.encoder.widths[1:])
    x = torch.randn(2, 1, *([16] * dims))
    mode = "trilinear" if dims == 3 else "bilinear"
    with torch.no_grad():
        enc = body.encoder(x)
        h = body.decoder.features(enc)
        z, _ = body(x)
        parts = [z, h] + [torch.nn.functional.interpolate(e, size=x.shape[2:], mode=mode, align_corners=False)
                          for e in enc[1:]]
        want = net.head(torch.cat(parts, 1))
        got = net(x)
    assert got.shape == (2, 1, *([16] * dims))
    torch.testing.assert_close(got, want)
    # the deepest level (1/16) reaches the logits: changing its weights changes the output
    with torch.no_grad():
        net.head.weight[:, -body.encoder.widths[4] :] += 1.0
    assert not torch.allclose(net(x), got)


def test_unit_embedding_head_reads_e_times_sqrt_d():
    net = seg.build_segnet(None, config=TINY, seed=0, head="e").eval()
    assert net.head.in_channels == TINY["emb_dim"]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        z, _ = net.body(x)
        e = z / (z.norm(dim=1, keepdim=True) + 1e-10)
        want = net.head(e * TINY["emb_dim"] ** 0.5)
        got = net(x)
    torch.testing.assert_close(got, want)
    # independent of the scale of z: z scaled by 7 (the embedding's last conv) gives the same logits
    last = net.body.decoder.emb_head[-1]
    with torch.no_grad():
        last.weight.mul_(7.0)
        last.bias.mul_(7.0)
        torch.testing.assert_close(net(x), got)
        assert not torch.allclose(net.body(x)[0], z)


def test_ld_init_copies_weights_random_does_not(tmp_path):
    torch.manual_seed(0)
    ld = LDNet(**TINY)
    ck = tmp_path / "ld.pt"
    save_checkpoint(ck, ld)
    a = seg.build_segnet(ck, seed=0)
    b = seg.build_segnet(None, config=ld.config, seed=5)
    w = "encoder.groups.0.0.0.weight"
    assert torch.equal(a.body.state_dict()[w], ld.state_dict()[w])
    assert not torch.equal(b.body.state_dict()[w], ld.state_dict()[w])
    assert a.body.n_clusters is None
    x = torch.randn(2, 1, 32, 32)
    assert a(x).shape == (2, 1, 32, 32)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    net = seg.build_segnet(None, config=TINY, seed=0)
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([(xx - 16) ** 2 + (yy - 16) ** 2 < 50] * 4)
    images = masks * 0.8 + 0.1
    losses = seg.train_segnet(net, images.astype(np.float32), masks, steps=30, lr=3e-3, batch=4)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_cli_writes_table_and_overlays(tmp_path):
    _write_pairs(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ld.pt", LDNet(**TINY))
    p = argparse.ArgumentParser()
    seg.add_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args(
        ["--checkpoint", str(tmp_path / "ld.pt"), "--images", str(tmp_path / "images"), "--masks",
         str(tmp_path / "masks"), "--shots", "2", "--seeds", "2", "--steps", "2", "--no-progress", "--out", str(out)]
    )
    assert seg.run(args) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["results"][0]
    # the defaults chosen on development slices (docs/tasks.md section 1), for both inits
    assert r["settings"]["head"] == "hypercolumn" and r["settings"]["warmup_steps"] == 10
    assert len(r["dice"]["LD"]) == 2 and len(r["dice"]["random"]) == 2
    assert [len(f) for f in r["train_files"]] == [2, 2] and not set(r["train_files"][0]) & set(r["test_files"])
    assert all(0.0 <= d <= 1.0 for d in r["dice"]["LD"] + r["dice"]["random"])
    assert "| masks |" in (out / "results.md").read_text()
    assert (out / "overlays.png").stat().st_size > 0
    args.shots = 5
    with pytest.raises(ValueError, match="shots=5"):
        seg.run(args)


def test_cli_missing_mask_and_size_mismatch(tmp_path):
    from PIL import Image

    _write_pairs(tmp_path, n=4)
    (tmp_path / "masks" / "s3_mask.png").unlink()
    save_checkpoint(tmp_path / "x.pt", LDNet(**TINY))
    p = argparse.ArgumentParser()
    seg.add_arguments(p)
    args = p.parse_args(
        ["--checkpoint", str(tmp_path / "x.pt"), "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
         "--out", str(tmp_path / "o")]
    )
    with pytest.raises(ValueError, match="no mask found for 1 image.*s3.png"):
        seg.run(args)
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(tmp_path / "masks" / "s3.png")
    with pytest.raises(ValueError, match="s3.png has size 32x32 but its mask s3.png has size 32x30"):
        seg.run(args)


@pytest.mark.parametrize("head", ["z", "e", "decoder", "hypercolumn"])
@pytest.mark.parametrize("balanced", [False, True])
def test_fit_head_folds_the_linear_probe_into_the_head(head, balanced):
    from ld_ext.tasks import common
    from ld_ext.tasks.probe import LinearProbe

    torch.manual_seed(0)
    net = seg.build_segnet(None, config=TINY, seed=0, head=head)
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([(xx - 12 - 3 * i) ** 2 + (yy - 16) ** 2 < 40 for i in range(3)])
    images = (masks * 0.6 + 0.2 + 0.05 * np.random.default_rng(0).standard_normal(masks.shape)).astype(np.float32)
    seg.fit_head(net, images, masks, balanced=balanced)
    assert not net.training
    with torch.no_grad():
        feats = net.head_features(common.model_input(images))
        got = torch.sigmoid(net(common.model_input(images)))[:, 0].numpy()
    want = LinearProbe(weight_decay=1e-3, balanced=balanced).fit(feats, masks).predict_proba(feats)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # the probe is a useful start: far better than the near-zero head (Dice 0 at 0.5)
    assert common.dice(got > 0.5, masks) > 0.5


def test_head_init_selects_the_start_per_init(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ld.pt", LDNet(**TINY))
    yy, xx = np.mgrid[0:32, 0:32]
    masks = np.stack([(xx - 16) ** 2 + (yy - 16) ** 2 < 30 + i for i in range(6)])
    images = (masks * 0.7 + 0.2).astype(np.float32)
    calls = []
    real = seg.fit_head
    monkeypatch.setattr(seg, "fit_head", lambda net, *a, **k: calls.append(k) or real(net, *a, **k))
    r = seg.transfer_experiment(images, masks, tmp_path / "ld.pt", shots=2, seeds=2, steps=1, progress=False)
    assert (r["settings"]["head_init"], r["settings"]["random_head_init"]) == ("probe", "zero")
    assert calls == [{"balanced": False}] * 2  # LD init only, once per seed
    calls.clear()
    seg.transfer_experiment(images, masks, tmp_path / "ld.pt", shots=2, seeds=1, steps=1, progress=False,
                            head_init="zero", random_head_init="probe-balanced")
    assert calls == [{"balanced": True}]
    net = seg.build_segnet(None, config=TINY, seed=0)
    with pytest.raises(ValueError, match="head_init"):
        seg.train_segnet(net, images, masks, steps=1, head_init="lp")


def test_cli_uses_the_checkpoints_training_size_or_warns(tmp_path, monkeypatch, caplog):
    """finetune: without --size the images are resized to the size the checkpoint was pre-trained at;
    a --size other than it is used with a warning naming both."""
    _write_pairs(tmp_path, n=4)
    torch.manual_seed(0)
    net = LDNet(**TINY)
    save_checkpoint(tmp_path / "ld.pt", {"config": net.config, "model": net.state_dict(), "train_config": {"size": 24}})
    seen = []

    def fake_experiment(images, masks, checkpoint, **kw):
        seen.append(images.shape)
        raise RuntimeError("stop here")

    monkeypatch.setattr(seg, "transfer_experiment", fake_experiment)
    p = argparse.ArgumentParser()
    seg.add_arguments(p)
    base = ["--checkpoint", str(tmp_path / "ld.pt"), "--images", str(tmp_path / "images"), "--masks",
            str(tmp_path / "masks"), "--out", str(tmp_path / "o")]
    with caplog.at_level("INFO", logger="ld_ext"), pytest.raises(RuntimeError, match="stop here"):
        seg.run(p.parse_args(base))
    assert seen[-1] == (4, 24, 24)
    assert "images resized to 24x24, the size" in caplog.text
    with pytest.warns(UserWarning, match=r"--size 32 differs from the size .*ld.pt was pre-trained at \(24\)"):
        with pytest.raises(RuntimeError, match="stop here"):
            seg.run(p.parse_args(base + ["--size", "32"]))
    assert seen[-1] == (4, 32, 32)
