"""LD on volumes: 3-D views (exact alignment of view 2), the objective on a 3-D grid, patch
reading per step, ``pretrain`` with ``dims=3`` (3-D checkpoints, stage 3 skipped, exact resume,
SIGKILL), the 2-D/3-D resume mismatch and the --dims flags."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ld_ext import train
from ld_ext.augment import (
    NORM_MEAN,
    NORM_STD,
    VolumeAugmentConfig,
    VolumeViewGenerator,
    align_to_v1_3d,
    item_generator,
)
from ld_ext.batching import Batches, patch_corner
from ld_ext.bench import synthetic_images
from ld_ext.checkpoint import load_checkpoint, load_model
from ld_ext.data import ImageFolderDataset
from ld_ext.models import LDNet
from ld_ext.objective import LDObjective

from helpers_train import (
    SMALL,
    assert_killed_run_resumed_equals_full,
    assert_loss_impls_agree,
    assert_resume_mid_epoch_is_exact,
    child_env,
    parse_pretrain_args,
    pretrain_refusal,
    read_metrics,
    small_config,
)

S = 16  # patch edge (the network's minimum)
EXACT = VolumeAugmentConfig.unwarped(view_rotation=0.0, brightness=0.0, contrast=0.0)


class MemVolumes:
    """A stand-in for the volume cache (``data.volume_cache.VolumePatchDataset``'s interface): it
    records every read, and a whole-volume read during training is an error."""

    def __init__(self, arrays, fingerprint=None):
        self.arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        self.names = [f"vol{i}.nii.gz" for i in range(len(self.arrays))]
        self.shapes = [a.shape for a in self.arrays]
        self.reads = []
        if fingerprint is not None:
            self.fingerprint = fingerprint

    def __len__(self):
        return len(self.arrays)

    def read_patch(self, i, start, size):
        out = np.zeros(size, np.float32)
        src = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, self.shapes[i]))
        dst = tuple(slice(max(0, s) - s, min(n, s + k) - s) for s, k, n in zip(start, size, self.shapes[i]))
        out[dst] = self.arrays[i][src]
        self.reads.append((i, tuple(start), tuple(size)))
        return torch.from_numpy(out)[None]

    def read_volume(self, i):
        raise AssertionError("pre-training must read patches, never a whole volume")


def _volumes(n=3, shape=(26, 24, 22), seed=0):
    """Smooth random volumes in [0, 1] with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.rand((1, 1, 6, 6, 6), generator=g)
        v = torch.nn.functional.interpolate(v, size=shape, mode="trilinear", align_corners=False)
        v = v + 0.1 * torch.rand((1, 1, *shape), generator=g)
        out.append(((v - v.min()) / (v.max() - v.min()))[0, 0].numpy())
    return out


# ----------------------------------------------------------------------------------------- views


def test_view2_realigned_onto_view1_exactly():
    """Without the small rotations and intensity changes, view 2 differs from view 1 only by its
    recorded flips/axial rotation: undoing them on the images (and so on any grid) gives view 1."""
    g = VolumeViewGenerator(S, EXACT)
    assert g.read_size == S
    src = torch.rand(4, 1, S, S, S)
    vb = g(src[:2], src[2:], [item_generator(1, i) for i in range(2)])
    assert vb.images.shape == (10, 1, S, S, S)
    assert vb.flips.any() and (vb.rot_k != 0).any()  # the test exercises the transforms
    torch.testing.assert_close(align_to_v1_3d(vb.images[4:8], vb.flips, vb.rot_k), vb.images[:4], rtol=0, atol=0)
    # each view holds the source's voxels exactly (flips and quarter turns, no interpolation)
    for view, source in enumerate(src):  # [img1_v1 (B), img2_v1 (B)] = the sources in order
        got = (vb.images[view] * NORM_STD + NORM_MEAN).flatten().sort().values
        torch.testing.assert_close(got, source.flatten().sort().values, rtol=0, atol=2e-6)
    w = vb.mix_w.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(vb.images[8:], (w * vb.images[:2] + (1 - w) * vb.images[2:4]), rtol=1e-5, atol=1e-5)


def test_source_rotations_stay_in_the_axial_plane():
    """A volume that varies only along Z is unchanged by the axial quarter turns (and by the
    X and Y flips): the rotations act on (X, Y), never on Z."""
    cfg = VolumeAugmentConfig.unwarped(view_rotation=0.0, brightness=0.0, contrast=0.0, v2_flip_p=0.0)
    z = torch.linspace(0, 1, S).view(1, 1, 1, 1, S).expand(1, 1, S, S, S).contiguous()
    seen_k = set()
    for seed in range(6):
        gen = item_generator(seed, 0)
        vb = VolumeViewGenerator(S, cfg)(z, z, [gen])
        seen_k |= set(vb.rot_k.tolist())
        for v in vb.images[:4] * NORM_STD + NORM_MEAN:
            assert torch.allclose(v, z[0], atol=2e-6) or torch.allclose(v, z[0].flip(-1), atol=2e-6)
    assert len(seen_k) > 1


def test_views_are_deterministic_per_item_and_margin_keeps_rotations_inside():
    g = VolumeViewGenerator(S)
    assert g.read_size > S  # a margin for the small rotations
    src = torch.rand(4, 1, g.read_size, g.read_size, g.read_size)
    a = g(src[:2], src[2:], [item_generator(3, i) for i in range(2)])
    b = g(src[:2], src[2:], [item_generator(3, i) for i in range(2)])
    alone = g(src[1:2], src[3:4], [item_generator(3, 1)])
    assert torch.equal(a.images, b.images)
    torch.testing.assert_close(alone.images[0], a.images[1])
    ones = torch.ones(2, 1, g.read_size, g.read_size, g.read_size)
    flat = VolumeViewGenerator(S, VolumeAugmentConfig(brightness=0.0, contrast=0.0))(
        ones[:1], ones[1:], [item_generator(0, 0)]
    )
    # a constant source stays constant: no zeros from outside the patch reach the corners
    torch.testing.assert_close(flat.images, torch.full_like(flat.images, (1 - NORM_MEAN) / NORM_STD))


def test_volume_view_errors():
    with pytest.raises(ValueError, match="size must be an int >= 16"):
        VolumeViewGenerator(8)
    g = VolumeViewGenerator(S, EXACT)
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        g(torch.rand(1, 1, S, S), torch.rand(1, 1, S, S), [item_generator(0)])
    with pytest.raises(ValueError, match="one generator per item"):
        g(torch.rand(2, 1, S, S, S), torch.rand(2, 1, S, S, S), [item_generator(0)])
    with pytest.raises(ValueError, match="flips"):
        align_to_v1_3d(torch.rand(2, 1, 4, 4, 4), torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2))


# ------------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("stage", [1, 2])
def test_3d_objective_fused_and_reference_agree(stage):
    torch.manual_seed(0)
    net = LDNet(1, 8, 4 if stage == 2 else None, SMALL, spatial_dims=3).double()
    g = VolumeViewGenerator(S)
    src = torch.rand(4, 1, g.read_size, g.read_size, g.read_size, dtype=torch.float64)
    vb = g(src[:2], src[2:], [item_generator(5, i) for i in range(2)])
    assert_loss_impls_agree(net, vb, grid=2, stage=stage)
    z, _ = net(vb.images)
    with pytest.raises(ValueError, match="must have 5 dims for a VolumeViewBatch"):
        LDObjective(grid=2)(z[..., 0], None, vb)


def test_3d_pd_pairs_the_same_sub_cubes():
    """With exact views, the realigned view-2 grid of sub-cubes equals view 1's cell by cell, so an
    embedding that is the image itself gives the PD term of identical positive pairs."""
    g = VolumeViewGenerator(S, EXACT)
    src = torch.rand(4, 1, S, S, S, dtype=torch.float64)
    vb = g(src[:2], src[2:], [item_generator(2, i) for i in range(2)])
    z = torch.cat([vb.images, vb.images**2, vb.images.exp()], dim=1)  # (5B, 3, S, S, S), voxel-wise
    f = torch.nn.functional.adaptive_avg_pool3d(z, 4)
    torch.testing.assert_close(vb.align_v2(f[4:8]), f[:4], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ batching


def test_patch_corner_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c = patch_corner((30, 20, 10), 16, g)
        assert 0 <= c[0] <= 14 and 0 <= c[1] <= 4 and -6 <= c[2] <= 0


def test_steps_read_only_patches_and_are_keyed_by_the_step():
    ds = MemVolumes(_volumes(3))
    kw = dict(n=3, gb=2, b=2, rank=0, seed=1, device=torch.device("cpu"), workers=0, patch=20)
    a = [x[1:] for x in Batches(ds, **kw).epoch(1, 0, 0, 2)]
    first = list(ds.reads)
    assert len(first) == 8 and all(size == (20, 20, 20) for _, _, size in first)
    b = [x[1:] for x in Batches(ds, **kw).epoch(1, 0, 1, 2)]  # resumed at step 1
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[0]))
    assert a[0][0].shape == (2, 1, 20, 20, 20)


def test_patches_from_the_volume_cache_equal_with_a_loader_worker(tmp_path):
    """The volume cache read by a DataLoader worker process gives the same patches as the training
    process reading it itself (the CUDA default)."""
    from ld_ext.data import open_or_build_volume_cache

    ds = open_or_build_volume_cache([str(_nifti_folder(tmp_path / "scans"))], cache=tmp_path / "cache")
    kw = dict(n=len(ds), gb=2, b=2, rank=0, seed=1, device=torch.device("cpu"), patch=20)
    own = [x[1] for x in Batches(ds, workers=0, **kw).epoch(2, 1, 0, 2)]
    worker = [x[1] for x in Batches(ds, workers=1, **kw).epoch(2, 1, 0, 2)]
    assert len(own) == 2 and all(torch.equal(a, b) for a, b in zip(own, worker))
    assert own[0].shape == (2, 1, 20, 20, 20) and float(own[0].abs().sum()) > 0


# ------------------------------------------------------------------------------------ pretrain


def _cfg(out, **kw):
    return small_config(out, **{"dims": 3, "size": S, **kw})


def test_3d_pretrain_writes_3d_checkpoints_and_skips_stage3(tmp_path, caplog):
    ds = MemVolumes(_volumes(3))
    with caplog.at_level(logging.INFO, logger="ld_ext.train"):
        summary = train.pretrain(_cfg(tmp_path / "run", centre_steps=3), dataset=ds)
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.spatial_dims == 3 and model.config["spatial_dims"] == 3 and model.n_clusters == 4
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["config"]["spatial_dims"] == 3 and ck["train_config"]["dims"] == 3
    assert load_model(tmp_path / "run" / "stage1.pt").spatial_dims == 3
    assert [(r["stage"], r["epoch"]) for r in summary["records"]] == [(1, 1), (2, 1), (2, 2)]
    assert "stage 3 (the centre-sensitive landmark term) is 2-D only: skipped with --dims 3" in caplog.text
    assert "landmark_model" not in load_checkpoint(tmp_path / "run" / "model.pt")
    assert "data: 3 volume(s), from 26x24x22 to 26x24x22 voxels" in caplog.text
    assert sorted(p.name for p in (tmp_path / "run" / "overlays").iterdir()) == [
        "stage1_epoch001.png", "stage2_epoch001.png", "stage2_epoch002.png"]
    read = VolumeViewGenerator(S).read_size
    assert {size for _, _, size in ds.reads} == {(read,) * 3, (S,) * 3}  # training patches, validation patches
    z, s = model(torch.rand(1, 1, 16, 16, 16))
    assert z.shape == (1, 8, 16, 16, 16) and s.shape == (1, 4, 16, 16, 16)


def test_3d_resume_from_the_middle_of_an_epoch_is_exact(tmp_path):
    """Ctrl-C inside stage 2 after a step checkpoint, then --resume: bitwise equal to an uninterrupted
    3-D run, metrics included (patch corners and views are keyed by the step, not drawn in order)."""
    ds = MemVolumes(_volumes(3), fingerprint="f")
    assert_resume_mid_epoch_is_exact(_cfg, ds, tmp_path, epochs1=1, epochs2=2, steps_per_epoch=3, checkpoint_every=1)


def _nifti_folder(root, n=3, seed=0):
    """Tiny NIfTI volumes (1.5 x 1 x 2 mm voxels, intensities like an MR scan's) in ``root``."""
    import nibabel as nib

    root.mkdir(parents=True)
    for i, v in enumerate(_volumes(n, seed=seed)):
        affine = np.diag([1.5, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image((v * 800 + 50).astype(np.float32), affine), str(root / f"scan{i}.nii.gz"))
    return root


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_pretrain_3d import _cfg
    from ld_ext import train
    out, kill = sys.argv[2], sys.argv[3] == "kill"
    def hook(info):
        if kill and (info["stage"], info["epoch"], info["step"]) == (2, 1, 2):
            assert info["checkpointed"]
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = _cfg(out, data=["nifti"], cache="cache", epochs2=2, steps_per_epoch=3, checkpoint_every=1,
               resume=sys.argv[3] == "resume")
    res = train.pretrain(cfg, on_step_end=hook)
    torch.save(res["final_model"].state_dict(), os.path.join(out, "final_state.pt"))
""")


def test_3d_resume_after_sigkill_mid_epoch_is_bitwise_equal(tmp_path):
    """A real SIGKILL right after a step checkpoint in the middle of stage 2 of a run on NIfTI volumes
    (through the volume cache), then --resume in a new process: the same weights and metrics as an
    uninterrupted run."""
    _nifti_folder(tmp_path / "nifti")
    (tmp_path / "child.py").write_text(_CHILD)
    env = child_env()

    def run(out, mode):
        args = [sys.executable, "child.py", str(Path(__file__).parent), str(tmp_path / out), mode]
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    for out, mode, rc in (("full", "plain", 0), ("cut", "kill", -9), ("cut", "resume", 0)):
        r = run(out, mode)
        assert r.returncode == rc, r.stdout[-2000:] + r.stderr[-2000:]
        if mode == "kill":
            ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
            assert (ck["stage"], ck["epoch"], ck["step"]) == (2, 1, 2)
    assert_killed_run_resumed_equals_full(tmp_path / "full", tmp_path / "cut", read_metrics(tmp_path / "full"))


def test_resume_across_dims_is_one_clear_error(tmp_path):
    imgs = ImageFolderDataset.from_tensor(synthetic_images(4, 32))
    two = dict(dims=2, size=32, grid=8, epochs2=0, steps_per_epoch=1, val_images=0)
    train.pretrain(_cfg(tmp_path / "r2", **two), dataset=imgs)
    with pytest.raises(ValueError, match=r"r2/checkpoint.pt is of a 2-D run \(--dims 2\), this run asks for --dims 3"):
        train.pretrain(_cfg(tmp_path / "r2", epochs2=0, resume=True), dataset=MemVolumes(_volumes(2)))
    train.pretrain(_cfg(tmp_path / "r3", epochs2=0, steps_per_epoch=1, val_images=0), dataset=MemVolumes(_volumes(2)))
    with pytest.raises(ValueError, match=r"is of a 3-D run \(--dims 3\), this run asks for --dims 2"):
        train.pretrain(_cfg(tmp_path / "r3", **two, resume=True), dataset=imgs)
    # a checkpoint of a version before 3-D runs (no "dims" in its train_config) is 2-D
    ck = load_checkpoint(tmp_path / "r2" / "checkpoint.pt")
    del ck["train_config"]["dims"]
    torch.save(ck, tmp_path / "r2" / "checkpoint.pt")
    with pytest.raises(ValueError, match="is of a 2-D run"):
        train.pretrain(_cfg(tmp_path / "r2", epochs2=0, resume=True), dataset=MemVolumes(_volumes(2)))


def test_cli_pretrain_dims_3_on_nifti_volumes(tmp_path, capsys):
    """``ld-ext pretrain --dims 3 --size 16`` on a folder of NIfTI volumes trains a 3-D network
    that ``load_model`` rebuilds; a second run reuses the volume cache."""
    from ld_ext.cli import main

    data = _nifti_folder(tmp_path / "scans", n=2)
    out = tmp_path / "run"
    argv = ["pretrain", "--dims", "3", "--size", "16", "--data", str(data), "--out", str(out), "--emb-dim", "8",
            "--clusters", "4", "--batch-size", "1", "--epochs1", "1", "--epochs2", "1", "--steps-per-epoch", "2",
            "--val-images", "1", "--no-progress", "--device", "cpu", "--spacing", "2", "2", "2", "--centre-steps", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "done in" in printed.out
    # resampled to 2 mm: 26 x 1.5 mm -> 20, 24 x 1 mm -> 12, 22 x 2 mm -> 22
    assert "data: 2 volume(s), from 20x12x22 to 20x12x22 voxels" in printed.err, printed.err
    model = load_model(out / "model.pt")
    assert model.spatial_dims == 3 and model.n_clusters == 4 and model.emb_dim == 8
    ck = load_checkpoint(out / "model.pt")
    assert ck["train_config"]["dims"] == 3 and ck["train_config"]["spacing"] == [2.0, 2.0, 2.0]
    z, s = model(torch.rand(1, 1, 16, 16, 16))
    assert z.shape == (1, 8, 16, 16, 16) and s.shape == (1, 4, 16, 16, 16)
    assert (out / "overlays" / "stage2_epoch001.png").exists()
    before = {p.name for p in (out / "cache").iterdir()}
    assert main([*argv, "--overwrite"]) == 0
    assert {p.name for p in (out / "cache").iterdir()} == before  # the same cache, not a second one


def test_dims_3_needs_a_volume_data_set(tmp_path):
    with pytest.raises(TypeError, match="--dims 3 trains on volumes"):
        train.pretrain(_cfg(tmp_path / "x"), dataset=ImageFolderDataset.from_tensor(synthetic_images(4, 32)))


# ----------------------------------------------------------------------------------------- flags


def test_dims_flags_and_their_defaults():
    cfg = parse_pretrain_args()
    assert (cfg.dims, cfg.size, cfg.grid, cfg.spacing, cfg.window) == (2, 128, 8, None, None)
    cfg = parse_pretrain_args("--dims", "3")
    assert (cfg.dims, cfg.size, cfg.grid) == (3, 64, 4)
    cfg = parse_pretrain_args("--dims", "3", "--size", "32", "--spacing", "1", "1", "2.5", "--window", "-1000", "400")
    assert (cfg.size, cfg.spacing, cfg.window, cfg.percentiles) == (32, (1.0, 1.0, 2.5), (-1000.0, 400.0), (0.5, 99.5))
    assert cfg.to_dict()["spacing"] == [1.0, 1.0, 2.5]


def test_help_shows_the_3d_defaults(capsys):
    from ld_ext.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128); with --dims 3 the cubic patch edge (default: 64)" in out
    assert "(default: 8; with --dims 3: 4, i.e. 64 cells)" in out
    assert "(default: None)" not in out


@pytest.mark.parametrize("argv, words", [
    (["--spacing", "1", "1", "1"], "--spacing applies to volumes only: add --dims 3"),
    (["--dims", "3", "--spacing", "1", "0", "1"], "--spacing must be 3 voxel sizes in mm > 0, got [1.0, 0.0, 1.0]"),
    (["--dims", "3", "--window", "400", "-1000"], "--window must be LOW HIGH with LOW < HIGH, got 400 -1000"),
    (["--dims", "3", "--percentiles", "2", "101"], "--percentiles must be LOW HIGH with 0 <= LOW < HIGH <= 100"),
    (["--dims", "3", "--channels", "3"], "--channels must be 1 with --dims 3 (volumes have one channel)"),
])
def test_bad_volume_flags_name_the_flag(tmp_path, capsys, argv, words):
    assert pretrain_refusal(tmp_path, capsys, argv).startswith(f"ld-ext: error: {words}")
