"""Training: the objective's wiring (fused vs reference), exact resume after an interruption, the CLI."""
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
from ld_ext.bench import make_training_step, synthetic_images
from ld_ext.models import LDNet
from ld_ext.objective import LOSS_IMPLS, LDObjective

from helpers_train import (
    SMALL,
    assert_killed_run_resumed_equals_full,
    assert_loss_impls_agree,
    assert_resume_mid_epoch_is_exact,
    assert_same_weights,
    child_env,
    parse_pretrain_args,
    pretrain_refusal,
    read_metrics,
    small_config,
    strip_timing,
)

S = 32


def _views(b=2, dtype=torch.float64):
    pool = synthetic_images(4, S, seed=2).to(dtype)
    return LDViewGenerator(S)(pool[:b], pool[b : 2 * b], [item_generator(5, i) for i in range(b)])


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_and_reference_losses_agree(stage):
    torch.manual_seed(0)
    net = LDNet(1, 8, 4 if stage == 2 else None, SMALL).double()
    lf = assert_loss_impls_agree(net, _views(), grid=4, stage=stage)
    total = lf["pd"] + lf["mix"] + (10 * lf["rd"] + 0.1 * lf["ent"] if stage == 2 else 0.0)
    assert lf["loss"] == pytest.approx(total, rel=1e-12)


def test_objective_temperatures_and_assignment_reach_the_loss_modules():
    """The temperatures of the config reach the loss modules (checked against the plain path at a
    non-default value), and the assignment kind is the network's."""
    torch.manual_seed(1)
    net = LDNet(1, 8, 4, SMALL).double()
    vb = _views()
    z, s = net(vb.images)
    got = {impl: LDObjective(impl, grid=4, rd_temperature=0.5, pd_temperature=0.3, assignment=net.assignment)(z, s, vb)
           for impl in LOSS_IMPLS}
    default = LDObjective("fused", grid=4)(z, s, vb)
    for k in ("rd", "pd", "mix"):
        fused, plain, base = (float(d[k].detach()) for d in (got["fused"], got["reference"], default))
        assert fused == pytest.approx(plain, rel=1e-9), k
        assert abs(fused - base) > 1e-6 * abs(base), k  # the temperature made a difference
    obj = LDObjective("fused", rd_temperature=0.5, pd_temperature=0.3, assignment=LDNet.assignment)
    assert (obj.region_loss.temperature, obj.patch_loss.temperature) == (0.5, 0.3)
    assert obj.region_loss.assignment == LDNet.assignment == "sigmoid"
    with pytest.raises(ValueError, match="temperature"):
        LDObjective(rd_temperature=0.0)
    with pytest.raises(ValueError, match="assignment"):
        LDObjective(assignment="relu")


@pytest.mark.parametrize("name", ["rd_temperature", "pd_temperature"])
@pytest.mark.parametrize("value", [0.0, -0.2, float("nan"), float("inf"), True, "0.2"])
def test_config_rejects_bad_temperatures(name, value):
    with pytest.raises(ValueError, match=name):
        train.TrainConfig(**{name: value}).validate()


def test_temperature_flags_map_to_the_config_with_the_published_defaults():
    cfg = parse_pretrain_args()
    assert (cfg.rd_temperature, cfg.pd_temperature) == (0.2, 0.1)  # docs/method.md sections 3 and 5
    cfg = parse_pretrain_args("--rd-temperature", "0.3", "--pd-temperature", "0.05")
    assert (cfg.rd_temperature, cfg.pd_temperature) == (0.3, 0.05)


def test_criterion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_impl"):
        LDObjective("cuda-magic")
    with pytest.raises(ValueError, match="grid"):
        LDObjective(grid=0)
    vb = _views()
    with pytest.raises(ValueError, match="5B"):
        LDObjective(grid=4)(torch.randn(3, 8, S, S, dtype=torch.float64), None, vb)


def _cfg(out, **kw):
    return small_config(out, **{"size": S, **kw})


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, monkeypatch):
    ds = ImageFolderDataset.from_tensor(synthetic_images(6, S, seed=4))
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
    real_call = LDObjective.__call__

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # calls 1-2: epoch (2, 1); call 3: epoch (2, 2) step 1; call 4: its step 2
            raise KeyboardInterrupt
        return real_call(self, *a, **k)

    monkeypatch.setattr(LDObjective, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(_cfg(out, resume=True), dataset=ds)
    monkeypatch.setattr(LDObjective, "__call__", real_call)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert (ck["stage"], ck["epoch"]) == (2, 1)  # the last complete epoch, intact

    resumed = train.pretrain(_cfg(out, resume=True), dataset=ds)
    assert_same_weights(resumed["final_model"].state_dict(), ref_state)
    assert strip_timing(resumed["records"]) == strip_timing(full["records"])
    assert strip_timing(read_metrics(out)) == strip_timing(full["records"])
    final = load_model(out / "model.pt")
    assert final.n_clusters == 4
    for k, v in final.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "stage1_epoch001.png", "stage2_epoch001.png", "stage2_epoch002.png"]


def test_resume_refuses_missing_corrupt_or_mismatched_checkpoints(tmp_path):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
    with pytest.raises(ValueError, match="no checkpoint"):
        train.pretrain(_cfg(tmp_path, resume=True), dataset=ds)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        train.pretrain(_cfg(tmp_path, resume=True), dataset=ds)
    train.pretrain(_cfg(tmp_path, epochs2=0, overwrite=True), dataset=ds)
    with pytest.raises(ValueError, match="emb_dim"):
        train.pretrain(_cfg(tmp_path, emb_dim=6, resume=True), dataset=ds)


@pytest.mark.parametrize("kw,match", [
    ({"loss_impl": "nope"}, "loss_impl"), ({"batch_size": 0}, "batch_size"), ({"epochs1": 0, "epochs2": 0}, "epochs"),
    ({"lr": -1.0}, "lr"), ({"size": 8}, "size"),
])
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train.pretrain(_cfg(tmp_path, **kw), dataset=ImageFolderDataset.from_tensor(synthetic_images(4, S)))


def test_make_training_step_runs_both_impls():
    torch.manual_seed(0)
    for impl in LOSS_IMPLS:
        step = make_training_step(LDNet(1, 8, 4, SMALL), impl, batch_size=2, size=S)
        assert step.images_per_call == 10
        a, b = step(), step()
        assert set(a) == {"loss", "pd", "mix", "rd", "ent"}
        assert all(np.isfinite(list(a.values()))) and a != b
    with pytest.raises(ValueError, match="loss_impl"):
        make_training_step(LDNet(1, 8, 4, SMALL), "nope")


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
               "--val-images", "2", "--no-progress", "--loss-impl", "reference", "--centre-steps", "2"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [1, 2, 3] and "rd" in recs[1] and recs[1]["images"] == 10  # 3: the landmark term
    assert load_model(out / "model.pt").n_clusters == 3
    assert load_model(out / "stage1.pt").n_clusters is None
    for name in ("checkpoint.pt", "losses.png", "overlays/stage2_epoch001.png"):
        assert (out / name).stat().st_size > 0, name
    cap = capsys.readouterr()
    epoch_lines = [x for x in cap.err.splitlines() if x.startswith("stage ")]
    assert len(epoch_lines) == 2 and epoch_lines[1].startswith("stage 2 epoch 1/1  loss "), cap.err
    assert "{" not in cap.out + cap.err  # the JSON records stay in metrics.jsonl
    assert cap.out.startswith("done in ") and str(out / "model.pt") in cap.out
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(out)])  # --data is required
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ld-ext: error: ") and "no supported image files" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="no supported image files"):
        main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "x"), "--no-progress", "--debug"])


def test_time_budget_cuts_each_stage_but_still_runs_stage2(tmp_path, caplog):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
    with caplog.at_level("INFO", logger="ld_ext"):
        res = train.pretrain(_cfg(tmp_path, epochs1=2, epochs2=2, steps_per_epoch=1, max_minutes=1e-6), dataset=ds)
    notices = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert len(notices) == 2 and notices[0].startswith("time budget: stage 1 stopped after epoch 1 of 2"), notices
    assert [(r["stage"], r["epoch"]) for r in res["records"]] == [(1, 1), (2, 1)]
    assert res["stopped_early"] and res["final_model"].n_clusters == 4


def test_stage2_from_a_stage1_checkpoint(tmp_path):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
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


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
    out = tmp_path / "run"
    train.pretrain(_cfg(out, epochs2=0, val_images=1), dataset=ds)
    before = _snapshot(out)
    assert {"checkpoint.pt", "stage1.pt", "model.pt", "metrics.jsonl"} <= set(before)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train.pretrain(_cfg(out, epochs2=0, seed=9), dataset=ds)
    assert _snapshot(out) == before  # nothing changed
    with pytest.raises(ValueError, match="exclude each other"):
        train.pretrain(_cfg(out, resume=True, overwrite=True), dataset=ds)
    # through the command: one error line, exit 2, files unchanged
    from ld_ext.cli import main

    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(img / "a.png")
    capsys.readouterr()
    assert main(["pretrain", "--data", str(img), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ld-ext: error: ") and "already holds a run" in err
    assert _snapshot(out) == before
    # --overwrite replaces the run: the old overlays and checkpoints go, the new run's files come
    (out / "overlays" / "stage1_epoch007.png").write_bytes(b"old")
    res = train.pretrain(_cfg(out, epochs1=1, epochs2=1, seed=9, overwrite=True, val_images=1), dataset=ds)
    assert [(r["stage"], r["epoch"]) for r in res["records"]] == [(1, 1), (2, 1)]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["stage1_epoch001.png", "stage2_epoch001.png"]
    assert load_model(out / "model.pt").n_clusters == 4


def test_stale_temp_files_are_removed_on_start_and_resume(tmp_path):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
    out = tmp_path / "run"
    out.mkdir()
    (out / "overlays").mkdir()
    ours = [out / ".checkpoint.pt.ab3_x9Zq.tmp", out / ".metrics.jsonl.k2j4h5g6.tmp", out / "overlays" / ".stage1_epoch001.png.abcdefgh.tmp"]
    foreign = [out / ".notes.txt.abcdefgh.tmp", out / "checkpoint.pt.tmp", out / ".checkpoint.pt.short.tmp", out / "keep.txt"]
    for p in ours + foreign:
        p.write_bytes(b"x")
    train.pretrain(_cfg(out, epochs2=0, val_images=1), dataset=ds)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in foreign)
    (out / ".checkpoint.pt.zzzzzzzz.tmp").write_bytes(b"x")
    train.pretrain(_cfg(out, epochs2=1, resume=True, val_images=1), dataset=ds)
    assert not (out / ".checkpoint.pt.zzzzzzzz.tmp").exists()


def test_signal_during_checkpoint_write_is_delivered_after_it(tmp_path, monkeypatch):
    """SIGINT in the middle of torch.save: the write completes, then the KeyboardInterrupt comes."""
    import os
    import signal

    from ld_ext import checkpoint as ck

    real_save = torch.save
    calls = {"n": 0}

    def save_with_sigint(obj, f, *a, **k):
        calls["n"] += 1
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint is being written
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_sigint)
    # Python's own SIGINT handler, also when the suite was started with SIGINT ignored (as a
    # background job of a non-interactive shell is): the test is about deferring that handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        path = tmp_path / "c.pt"
        with pytest.raises(KeyboardInterrupt):
            with ck.defer_signals():
                ck.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
        assert calls["n"] == 1
        assert load_checkpoint(path)["epoch"] == 1  # complete, readable
        assert list(tmp_path.iterdir()) == [path]  # no temp file left
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupted_cli_run_exits_130_with_a_clean_message(tmp_path, capsys, monkeypatch):
    from ld_ext.cli import main

    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(img / f"{i}.png")

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LDObjective, "__call__", stop)
    rc = main(["pretrain", "--data", str(img), "--out", str(tmp_path / "o"), "--size", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted; no epoch was completed" in err and "Traceback" not in err


def _training_checkpoint(tmp_path):
    ds = ImageFolderDataset.from_tensor(synthetic_images(4, S))
    out = tmp_path / "good"
    train.pretrain(_cfg(out, epochs1=1, epochs2=1, val_images=0), dataset=ds)
    return ds, load_checkpoint(out / "checkpoint.pt")


def _bad_states():
    def setter(key, value):
        def f(st):
            st[key] = value
        return f

    def deleter(key):
        def f(st):
            del st[key]
        return f

    def opt(f2):
        def f(st):
            f2(st["optimizer"])
        return f

    return {
        "epoch -3": (setter("epoch", -3), "'epoch' must be an int >= 0"),
        "epoch str": (setter("epoch", "2"), "'epoch' must be an int"),
        "stage 3": (setter("stage", 3), "'stage' must be 1 or 2"),
        "stage float": (setter("stage", 2.0), "'stage' must be 1 or 2"),
        "train_config str": (setter("train_config", "abc"), "'train_config' must be a dict"),
        "no optimizer": (deleter("optimizer"), "not a training checkpoint"),
        "optimizer list": (setter("optimizer", [1, 2]), "'optimizer' must be a dict"),
        "optimizer no groups": (opt(lambda o: o.pop("param_groups")), "not an optimiser state_dict"),
        "optimizer groups empty": (opt(lambda o: o.__setitem__("param_groups", [])), "optimiser state cannot be restored"),
        "optimizer groups bad": (opt(lambda o: o.__setitem__("param_groups", [{"params": "x"}])), "optimiser state cannot be restored"),
        "scheduler str": (setter("scheduler", "abc"), "'scheduler' must be a dict"),
        "scheduler bad": (setter("scheduler", {"last_epoch": "x", "_step_count": None, "base_lrs": 3}), "cannot be restored"),
        "scheduler step str": (lambda st: st["scheduler"].__setitem__("_step_count", "x"), "cannot be restored"),
        "optimizer lr str": (opt(lambda o: o["param_groups"][0].__setitem__("lr", "x")), "optimiser state cannot be restored"),
        "optimizer state shape": (opt(lambda o: o["state"][0].__setitem__("exp_avg", torch.ones(3))), "optimiser state cannot be restored"),
        "rng str": (setter("rng", "abc"), "'rng' is not the RNG state"),
        "rng short": (lambda st: st["rng"].__setitem__("python", [1, 2]), "'rng' is not the RNG state"),
        "model wrong keys": (setter("model", {"w": torch.ones(2)}), "model weights cannot be restored"),
        "model str": (setter("model", "abc"), "'model' entry is not a state dict"),
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_resume_rejects_malformed_training_checkpoints_naming_the_file(tmp_path, case):
    import copy

    ds, good = _training_checkpoint(tmp_path)
    mutate, words = _bad_states()[case]
    st = copy.deepcopy(good)
    mutate(st)
    out = tmp_path / "bad"
    out.mkdir()
    torch.save(st, out / "checkpoint.pt")
    with pytest.raises(ValueError) as info:
        train.pretrain(_cfg(out, epochs1=1, epochs2=2, val_images=0, resume=True), dataset=ds)
    msg = str(info.value)
    assert str(out / "checkpoint.pt") in msg and words in msg, msg


def test_sigterm_during_a_write_is_delivered_after_it(tmp_path):
    import os
    import signal

    from ld_ext import checkpoint as ck

    class Terminated(Exception):
        pass

    def on_term(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        path = tmp_path / "c.pt"
        with pytest.raises(Terminated):
            with ck.defer_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                ck.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})  # not interrupted
        assert load_checkpoint(path)["epoch"] == 3 and list(tmp_path.iterdir()) == [path]
        assert signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- streaming from the cache


def _folder(root, n=10, seed=0, size=40):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray((rng.random((size, size + 4)) * 65535).astype(np.uint16)).save(sub / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_streaming_from_the_cache_equals_the_in_memory_path(tmp_path, loader_workers):
    from ld_ext.data import open_or_build_cache

    cfg = _cfg(tmp_path / "x", epochs2=1, data=[str(_folder(tmp_path / "data"))], loader_workers=loader_workers)
    cache = open_or_build_cache(cfg.data, cfg.preprocessing(), tmp_path / "cache", workers=0, progress=False)
    streamed = train.pretrain(_cfg(tmp_path / "s", epochs2=1, loader_workers=loader_workers), dataset=cache)
    in_memory = train.pretrain(_cfg(tmp_path / "m", epochs2=1), dataset=ImageFolderDataset.from_tensor(cache.read(range(len(cache)))))
    assert streamed["streaming"] and not in_memory["streaming"]
    a, b = streamed["final_model"].state_dict(), in_memory["final_model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert strip_timing(streamed["records"]) == strip_timing(in_memory["records"])
    # pretrain(cfg) with cfg.data builds the same cache (under OUT/cache by default) and streams from it
    via_cfg = train.pretrain(_cfg(tmp_path / "c", epochs2=1, data=cfg.data, loader_workers=loader_workers))
    assert via_cfg["streaming"] and via_cfg["n_images"] == 10
    assert [p.name for p in (tmp_path / "c" / "cache").iterdir() if not p.name.startswith(".")] == [cache.root.name]
    for k, v in via_cfg["final_model"].state_dict().items():
        assert torch.equal(v, a[k]), k


def test_resume_from_the_middle_of_an_epoch_is_exact(tmp_path):
    """Ctrl-C inside an epoch after a step checkpoint (--checkpoint-every 1): --resume continues at
    the next step and ends bitwise equal to an uninterrupted run, metrics included."""
    from ld_ext.data import open_or_build_cache

    data = [str(_folder(tmp_path / "data"))]
    cache = open_or_build_cache(data, _cfg(tmp_path).preprocessing(), tmp_path / "cache", workers=0, progress=False)
    ck = assert_resume_mid_epoch_is_exact(_cfg, cache, tmp_path, epochs1=1, epochs2=2, steps_per_epoch=3,
                                          checkpoint_every=1)
    assert set(ck["sums"]) >= {"loss", "rd"}
    with pytest.raises(ValueError, match="checkpoint_every"):
        train.pretrain(_cfg(tmp_path / "bad", checkpoint_every=-1), dataset=cache)


def test_resume_after_sigkill_mid_epoch_is_bitwise_equal(tmp_path):
    """A real SIGKILL (the process kills itself right after a step checkpoint in the middle of
    stage 2, epoch 2), then --resume in a new process: the same weights as an uninterrupted run."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("dist_worker.py")
    data = str(_folder(tmp_path / "data"))
    env = child_env()
    common = [data, None, str(tmp_path / "cache"), "2", "--epochs", "2", "--steps", "3", "--dtype", "float32",
              "--checkpoint-every", "1"]

    def run(out, *extra):
        args = list(common)
        args[1] = str(tmp_path / out)
        return subprocess.run([sys.executable, str(worker), *args, *extra], env=env, capture_output=True, text=True, timeout=600)

    full = run("full")
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    killed = run("cut", "--kill-stage", "2", "--kill-epoch", "1", "--kill-step", "2")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "checkpointed: True" in killed.stdout
    ck = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (ck["stage"], ck["epoch"], ck["step"]) == (2, 1, 2)
    resumed = run("cut", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    full_records = json.loads((tmp_path / "full" / "summary.json").read_text())["records"]
    assert_killed_run_resumed_equals_full(tmp_path / "full", tmp_path / "cut", full_records)


@pytest.mark.parametrize("argv, words", [
    (["--centre-steps", "-1"], "--centre-steps must be an int >= 0, got -1"),
    (["--clusters", "0"], "--clusters must be an int >= 1, got 0"),
    (["--epochs1", "0", "--epochs2", "0"], "--epochs1 + --epochs2 must be > 0"),
    (["--rd-temperature", "0"], "--rd-temperature must be a positive number, got 0.0"),
])
def test_pretrain_bad_value_error_names_the_flag(tmp_path, capsys, argv, words):
    assert pretrain_refusal(tmp_path, capsys, argv) == f"ld-ext: error: {words}\n"
