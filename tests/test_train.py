"""Training: loss wiring (fused vs reference), exact resume after an interruption, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ld_ext import train
from ld_ext.augment import LDViewGenerator, item_generator
from ld_ext.checkpoint import load_checkpoint, load_model
from ld_ext.data import ImageFolderDataset
from ld_ext.models import LDNet

SMALL = (8, 8, 16, 16, 16)
S = 32


def _views(b=2, dtype=torch.float64):
    pool = train.synthetic_images(4, S, seed=2).to(dtype)
    return LDViewGenerator(S)(pool[:b], pool[b : 2 * b], [item_generator(5, i) for i in range(b)])


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_and_reference_losses_agree(stage):
    torch.manual_seed(0)
    net = LDNet(1, 8, 4 if stage == 2 else None, SMALL).double()
    vb = _views()
    out = {}
    for impl in train.LOSS_IMPLS:
        net.zero_grad()
        z, s = net(vb.images)
        losses = train.LDCriterion(impl, grid=4)(z, s, vb)
        losses["loss"].backward()
        out[impl] = ({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in net.parameters()])
    (lf, gf), (lr, gr) = out["fused"], out["reference"]
    assert set(lf) == ({"loss", "pd", "mix", "rd", "ent"} if stage == 2 else {"loss", "pd", "mix"})
    for k in lf:
        assert lf[k] == pytest.approx(lr[k], rel=1e-9), k
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    total = lf["pd"] + lf["mix"] + (10 * lf["rd"] + 0.1 * lf["ent"] if stage == 2 else 0.0)
    assert lf["loss"] == pytest.approx(total, rel=1e-12)


def test_criterion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_impl"):
        train.LDCriterion("cuda-magic")
    with pytest.raises(ValueError, match="grid"):
        train.LDCriterion(grid=0)
    vb = _views()
    with pytest.raises(ValueError, match="5B"):
        train.LDCriterion(grid=4)(torch.randn(3, 8, S, S, dtype=torch.float64), None, vb)


def _cfg(out, **kw):
    base = dict(out=str(out), size=S, emb_dim=8, n_clusters=4, widths=SMALL, batch_size=2, epochs1=1, epochs2=2,
                steps_per_epoch=2, lr_step=1, val_images=2, progress=False, seed=3, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "data_wait_s")} for r in records]


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, monkeypatch):
    ds = ImageFolderDataset.from_tensor(train.synthetic_images(6, S, seed=4))
    full = train.pretrain(_cfg(tmp_path / "full"), dataset=ds)
    ref_state = full["final_model"].state_dict()
    assert [(r["stage"], r["epoch"]) for r in full["records"]] == [(1, 1), (2, 1), (2, 2)]
    assert full["records"][2]["lr"] == pytest.approx(0.25e-3)  # halved after each stage-2 epoch

    out = tmp_path / "interrupted"

    def stop_after_first_epoch(rec):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.pretrain(_cfg(out), dataset=ds, on_epoch_end=stop_after_first_epoch)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert (ck["stage"], ck["epoch"]) == (1, 1)

    # second interruption: Ctrl-C in the middle of stage 2, epoch 2 (after one more complete epoch)
    calls = {"n": 0}
    real_call = train.LDCriterion.__call__

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # calls 1-2: epoch (2, 1); call 3: epoch (2, 2) step 1; call 4: its step 2
            raise KeyboardInterrupt
        return real_call(self, *a, **k)

    monkeypatch.setattr(train.LDCriterion, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(_cfg(out, resume=True), dataset=ds)
    monkeypatch.setattr(train.LDCriterion, "__call__", real_call)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert (ck["stage"], ck["epoch"]) == (2, 1)  # the last complete epoch, intact

    resumed = train.pretrain(_cfg(out, resume=True), dataset=ds)
    got = resumed["final_model"].state_dict()
    assert got.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.equal(got[k], ref_state[k]), k
    assert _strip(resumed["records"]) == _strip(full["records"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert _strip([json.loads(x) for x in lines]) == _strip(full["records"])
    final = load_model(out / "model.pt")
    assert final.n_clusters == 4
    for k, v in final.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "stage1_epoch001.png", "stage2_epoch001.png", "stage2_epoch002.png"]


def test_resume_refuses_missing_corrupt_or_mismatched_checkpoints(tmp_path):
    ds = ImageFolderDataset.from_tensor(train.synthetic_images(4, S))
    with pytest.raises(ValueError, match="no checkpoint"):
        train.pretrain(_cfg(tmp_path, resume=True), dataset=ds)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        train.pretrain(_cfg(tmp_path, resume=True), dataset=ds)
    train.pretrain(_cfg(tmp_path, epochs2=0), dataset=ds)
    with pytest.raises(ValueError, match="emb_dim"):
        train.pretrain(_cfg(tmp_path, emb_dim=6, resume=True), dataset=ds)


@pytest.mark.parametrize("kw,match", [
    ({"loss_impl": "nope"}, "loss_impl"), ({"batch_size": 0}, "batch_size"), ({"epochs1": 0, "epochs2": 0}, "epochs"),
    ({"lr": -1.0}, "lr"), ({"size": 8}, "size"),
])
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train.pretrain(_cfg(tmp_path, **kw), dataset=ImageFolderDataset.from_tensor(train.synthetic_images(4, S)))


def test_make_training_step_runs_both_impls():
    torch.manual_seed(0)
    for impl in train.LOSS_IMPLS:
        step = train.make_training_step(LDNet(1, 8, 4, SMALL), impl, batch_size=2, size=S)
        assert step.images_per_call == 10
        a, b = step(), step()
        assert set(a) == {"loss", "pd", "mix", "rd", "ent"}
        assert all(np.isfinite(list(a.values()))) and a != b
    with pytest.raises(ValueError, match="loss_impl"):
        train.make_training_step(LDNet(1, 8, 4, SMALL), "nope")


def test_cli_pretrain_on_a_folder(tmp_path, capsys):
    from ld_ext.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        arr = (rng.random((40, 40)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(tmp_path / "imgs"), "--out", str(out), "--size", "32", "--emb-dim", "8",
               "--clusters", "3", "--batch-size", "2", "--epochs1", "1", "--epochs2", "1", "--steps-per-epoch", "1",
               "--val-images", "2", "--no-progress", "--loss-impl", "reference"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [1, 2] and "rd" in recs[1] and recs[1]["images"] == 10
    assert load_model(out / "model.pt").n_clusters == 3
    assert load_model(out / "stage1.pt").n_clusters is None
    for name in ("checkpoint.pt", "losses.png", "overlays/stage2_epoch001.png"):
        assert (out / name).stat().st_size > 0, name
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(out)])  # --data is required
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no supported image files"):
        main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "x"), "--no-progress"])


def test_time_budget_cuts_each_stage_but_still_runs_stage2(tmp_path):
    ds = ImageFolderDataset.from_tensor(train.synthetic_images(4, S))
    with pytest.warns(UserWarning, match="time budget"):
        res = train.pretrain(_cfg(tmp_path, epochs1=2, epochs2=2, steps_per_epoch=1, max_minutes=1e-6), dataset=ds)
    assert [(r["stage"], r["epoch"]) for r in res["records"]] == [(1, 1), (2, 1)]
    assert res["stopped_early"] and res["final_model"].n_clusters == 4


def test_stage2_from_a_stage1_checkpoint(tmp_path):
    ds = ImageFolderDataset.from_tensor(train.synthetic_images(4, S))
    train.pretrain(_cfg(tmp_path / "s1", epochs2=0, val_images=0), dataset=ds)
    s1 = load_checkpoint(tmp_path / "s1" / "stage1.pt")["model"]
    res = train.pretrain(_cfg(tmp_path / "s2", init_stage1=str(tmp_path / "s1" / "stage1.pt"), epochs2=1, lr=1e-12,
                              val_images=0), dataset=ds)
    assert [r["stage"] for r in res["records"]] == [2]
    params = dict(res["final_model"].named_parameters())
    for k, v in s1.items():
        if k in params:  # weights moved by at most ~lr: they came from the stage-1 file, by name
            torch.testing.assert_close(params[k].detach(), v, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="stage1.pt"):
        train.pretrain(_cfg(tmp_path / "s3", init_stage1=str(tmp_path / "s1" / "stage1.pt"), emb_dim=6), dataset=ds)
