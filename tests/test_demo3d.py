"""``ld-ext demo --dims 3``: the warped copies of the template (grid, determinism, labels, NIfTI files),
the flags (3-D defaults where left out, one-line refusals), the probe on held-out copies and its
verdict, the figure, and a tiny run end to end (never the full demo: the suite stays fast)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from ld_ext import demos
from ld_ext.checkpoint import load_checkpoint, load_model
from ld_ext.demos import volumes3d, warps3d
from ld_ext.demos.common import DemoDefault, plain_defaults
from ld_ext.demos.mni import STRUCTURES
from ld_ext.models import LDNet

SPACING = 8.0  # mm: a 21 x 25 x 22 grid, small enough for the suite


@pytest.fixture(scope="module")
def grid():
    pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
    pytest.importorskip("scipy", reason="the copies are smoothed with scipy.ndimage")
    return warps3d.demo_grid(SPACING)


def _parse(argv):
    parser = argparse.ArgumentParser()
    demos.add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- the copies


def test_grid_is_a_ras_box_around_the_brain(grid):
    assert max(grid.shape) <= 48 and min(grid.shape) >= 16
    assert np.allclose(np.diag(grid.affine)[:3], SPACING) and np.allclose(grid.affine[:3, 3], grid.origin)
    mm = grid.mm()
    assert mm.shape == (*grid.shape, 3)
    assert torch.allclose(mm[1, 0, 0] - mm[0, 0, 0], torch.tensor([SPACING, 0, 0], dtype=torch.float64))
    # the box holds the brain: the template's centre of mass lies near the grid's centre
    assert (mm.reshape(-1, 3).mean(0).abs() < 40).all()
    with pytest.raises(ValueError, match="spacing must be a number of mm in"):
        warps3d.demo_grid(0.5)


def test_an_identity_warp_samples_the_template_and_its_structures(grid):
    """No warp and no intensity change but the overall scale: the copy is the (smoothed) template on the
    grid, and each structure's label sits where the structure is (no axis swapped or flipped)."""
    from ld_ext.demos.mni import mni_volume

    still = warps3d.WarpConfig(rotation_deg=0, scale=0, shift_mm=0, elastic_mm=0, gamma=1.0, bias=0, noise=0)
    image, labels = warps3d.warp_copy(grid, torch.Generator().manual_seed(0), still)
    t1, aff = mni_volume("t1")
    mm = grid.mm().numpy()
    ijk = np.rint((mm - aff[:3, 3]) / np.diag(aff)[:3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(t1.shape)), -1)
    i, j, k = ijk[inside].T
    assert np.corrcoef(image[inside], t1[i, j, k])[0, 1] > 0.9
    src, src_aff = warps3d.source_volumes(SPACING)  # the smoothed masks the labels are read from
    masks = src[0, 1:].numpy()
    src_mm = np.argwhere(np.ones(masks.shape[1:], bool)) * np.diag(src_aff)[:3] + src_aff[:3, 3]
    for n, name in enumerate(STRUCTURES):
        keep = ((masks[n] > 0.5) & (masks[n] >= masks.max(0))).reshape(-1)
        want = src_mm[keep].mean(0)  # centre in mm of the structure as the copies label it
        got = mm[labels == n + 1].mean(0)
        assert keep.any() and np.abs(got - want).max() < SPACING, name


def test_copies_are_deterministic_per_seed_and_differ_between_seeds(grid):
    a, la = warps3d.warp_copy(grid, torch.Generator().manual_seed(3))
    b, lb = warps3d.warp_copy(grid, torch.Generator().manual_seed(3))
    c, lc = warps3d.warp_copy(grid, torch.Generator().manual_seed(4))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(la, lc) and np.abs(a / a.max() - c / c.max()).mean() > 0.01
    assert a.dtype == np.float32 and la.dtype == np.uint8 and a.shape == la.shape == grid.shape
    assert set(np.unique(la)) == set(range(len(STRUCTURES) + 1))  # every structure survives the warp


def test_written_copies_read_back_on_the_grid(tmp_path, grid):
    from ld_ext.data.volumes import read_volume

    paths = warps3d.write_warps(tmp_path / "img", tmp_path / "lab", 2, 7, grid)
    assert [p.name for p in paths] == ["warp_000.nii.gz", "warp_001.nii.gz"]
    image, labels = warps3d.warp_copy(grid, torch.Generator().manual_seed(7 * 1_000_003 + 1))
    vol = read_volume(paths[1], percentiles=(0, 100))
    lab = read_volume(tmp_path / "lab" / "warp_001.nii.gz", label=True)
    assert vol.array.shape == grid.shape and np.allclose(vol.affine, grid.affine)
    assert np.allclose(vol.array, (image - image.min()) / (image.max() - image.min()), atol=1e-5)
    assert np.array_equal(lab.array, labels)


# ----------------------------------------------------------------------------------------- the flags


def test_dims_3_takes_its_own_defaults_only_for_the_flags_left_out():
    args = volumes3d.resolve_volume_args(_parse(["--dims", "3"]))
    for name, value in volumes3d.DEFAULTS_3D.items():
        assert getattr(args, name) == value and type(getattr(args, name)) is int
    assert not any(isinstance(v, DemoDefault) for v in vars(args).values())
    args = volumes3d.resolve_volume_args(_parse(["--dims", "3", "--size", "48", "--batch-size", "4"]))
    assert (args.size, args.batch_size, args.epochs2) == (48, 4, volumes3d.DEFAULTS_3D["epochs2"])
    # the 2-D demo keeps its own defaults, as plain ints (nothing of the marker type reaches a checkpoint)
    two = _parse([])
    assert (two.dims, two.size, two.batch_size) == (2, 128, 4) and isinstance(two.size, DemoDefault)
    plain_defaults(two)
    assert type(two.size) is int and type(two.lr_step) is int


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--centre-steps", "5"], "--centre-steps: stage 3"),
        (["--task", "probe"], "--dims 3 runs the pre-training demo only"),
        (["--max-minutes", "3"], "--max-minutes is for the 2-D demo"),
        (["--size", "40"], "--size must be a multiple of 16"),
        (["--heldout-warps", "1"], "--heldout-warps must be >= 2"),
        (["--warps", "0"], "--warps must be >= 1"),
        (["--spacing", "20"], "spacing must be a number of mm"),
    ],
)
def test_dims_3_refuses_what_it_cannot_do_in_one_line(argv, words):
    with pytest.raises(ValueError, match=words.replace("-", r"\-")) as err:
        volumes3d.resolve_volume_args(_parse(["--dims", "3", *argv]))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- the probe


def test_volumes_of_an_earlier_run_are_replaced(tmp_path, grid):
    out = tmp_path / "demo"
    args = argparse.Namespace(spacing=SPACING, warps=3, heldout_warps=2, seed=0)
    volumes3d.make_volumes(out, args)
    first = (out / "volumes" / "train" / "warp_000.nii.gz").read_bytes()
    args.warps, args.seed = 1, 5
    dirs = volumes3d.make_volumes(out, args)
    assert [p.name for p in sorted(dirs["train"].iterdir())] == ["warp_000.nii.gz"]
    assert (out / "volumes" / "train" / "warp_000.nii.gz").read_bytes() != first
    assert len(list(dirs["images"].iterdir())) == len(list(dirs["labels"].iterdir())) == 2


def _result(label, means):
    return {"label": label, "summary": {m: {"1": {"mean": v, "std": 0.0}} for m, v in means.items()}}


def test_verdict_names_every_structure_where_ld_does_not_win():
    win = {"LD": 0.6, "random-init": 0.5, "intensity": 0.7, "position": 0.4}
    ok, line = volumes3d.verdict([_result("thalamus", win), _result("striatum", win)])
    assert ok and "beats the random-init network and the position control on every structure" in line
    ok, line = volumes3d.verdict([_result("thalamus", win), _result("striatum", {**win, "position": 0.6})])
    assert not ok and "striatum (position 0.600 >= LD 0.600)" in line and "thalamus" not in line


def test_probe_on_heldout_copies_scores_every_structure_and_method(grid, tmp_path):
    warps3d.write_warps(tmp_path / "img", tmp_path / "lab", 4, 11, grid)
    names, vols, labels = volumes3d.load_heldout(tmp_path / "img", tmp_path / "lab")
    assert names == [f"warp_{i:03d}.nii.gz" for i in range(4)] and vols[0].max() <= 1.0
    torch.manual_seed(0)
    model = LDNet(1, 8, 4, widths=(4, 4, 8, 8, 8), spatial_dims=3).eval()
    args = argparse.Namespace(size=16, probe_seeds=2)
    steps = []
    results, figure = volumes3d.probe_heldout(model, vols, labels, args, on_step=lambda: steps.append(1))
    assert [r["label"] for r in results] == list(STRUCTURES)
    assert len(steps) == 3 + 2  # LD, intensity, position once; the random-init network per seed
    for r in results:
        assert r["unit"] == "volume" and r["methods"] == ["LD", "random-init", "intensity", "position"]
        assert r["splits"] == results[0]["splits"] and len(r["splits"]["1"]["test"]) == 2  # half held out
        for m in r["methods"]:
            assert len(r["dice"][m]["1"]) == 2 and all(0.0 <= d <= 1.0 for d in r["dice"][m]["1"])
    # the figure shows a test volume, predicted by probes fitted on seed 0's training volume
    split = results[0]["splits"]["1"]
    assert figure["show"] in split["test"] and [figure["train"]] == split["train"][0]
    assert set(figure["preds"]) == set(volumes3d.FIGURE_METHODS)
    for preds in figure["preds"].values():
        assert set(preds) == set(STRUCTURES) and all(p.shape == grid.shape and p.dtype == bool for p in preds.values())
    truth = {n: labels[figure["show"]] == k + 1 for k, n in enumerate(STRUCTURES)}
    path = volumes3d.save_slices_figure(tmp_path / "f.png", vols[figure["show"]], truth, figure["preds"], "t")
    assert path.stat().st_size > 1000


def test_tiny_volume_demo_end_to_end(tmp_path, capsys, grid):
    out = tmp_path / "demo"
    argv = ["--dims", "3", "--out", str(out), "--spacing", str(SPACING), "--warps", "2", "--heldout-warps", "4"]
    argv += ["--size", "16", "--epochs1", "1", "--epochs2", "1", "--steps-per-epoch", "1", "--batch-size", "1"]
    argv += ["--clusters", "4", "--probe-seeds", "1", "--no-progress", "--threads", "1"]
    args = _parse(argv)
    assert demos.run(args) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "demo_results.json").read_text())
    assert res["dims"] == 3 and set(res["seconds_per_phase"]) == set(volumes3d.PHASE_SECONDS)
    assert [r["label"] for r in res["probe"]] == list(STRUCTURES)
    assert "LD's probe" in printed and "| ventricles | 1 |" in printed and "| corpus_callosum | 1 |" in printed
    assert (out / "probe" / "results.md").exists() and (out / "probe" / "slices.png").exists()
    # the network is 3-D and was pre-trained on the unlabelled copies only, never on the held-out ones
    assert load_model(out / "model.pt").config["spatial_dims"] == 3
    assert load_checkpoint(out / "model.pt")["train_config"]["data"] == [str(out / "volumes" / "train")]
    # the demo's learning rate (chosen on other warps than the ones it reports on) is the one it trains with
    assert load_checkpoint(out / "model.pt")["train_config"]["lr"] == volumes3d.LR_3D == res["settings"]["lr"]
    train = sorted((out / "volumes" / "train").iterdir())
    held = sorted((out / "volumes" / "heldout" / "images").iterdir())
    assert len(train) == 2 and len(held) == 4
    import nibabel as nib

    a = [np.asarray(nib.load(str(p)).dataobj) for p in train]
    b = [np.asarray(nib.load(str(p)).dataobj) for p in held]
    assert not any(np.array_equal(x, y) for x in a for y in b)
