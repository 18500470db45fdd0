"""`ld-ext pretrain` guards: the lock on --out, one error line for a NaN loss and a full disk,
Ctrl-C at any time (imports included), the data summary at start, --resume checked before the
cache is built."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ld_ext import atomic
from ld_ext.cli import main
from ld_ext.objective import LDObjective

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--size", "32", "--emb-dim", "8", "--clusters", "3", "--batch-size", "2", "--epochs1", "1", "--epochs2", "1",
         "--steps-per-epoch", "1", "--val-images", "1", "--no-progress", "--loss-impl", "reference",
         "--centre-steps", "0", "--workers", "0"]


def _pngs(root: Path, n: int = 4, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + ((":" + env["PYTHONPATH"]) if env.get("PYTHONPATH") else "")
    return env


def _error_line(err: str) -> str:
    """The one error line (other lines on stderr are the log: data summary, warnings)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("ld-ext: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- the lock on --out


def test_a_second_run_into_a_held_out_is_refused_and_a_killed_holder_does_not_block(tmp_path, capsys):
    data, out = _pngs(tmp_path / "data"), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ld_ext.atomic import lock_folder; lock_folder(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["pretrain", "--data", str(data), "--out", str(out), *SMALL]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"ld-ext: error: --out: {out} is in use by another ld-ext run (pid {holder.pid} on host ")
        assert "started 20" in line and "choose another --out" in line
        # --resume and --overwrite are refused the same way (the live run's files are not touched)
        assert main(["pretrain", "--data", str(data), "--out", str(out), "--overwrite", *SMALL]) == 2
        assert "is in use by another ld-ext run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [atomic.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
    assert main(["pretrain", "--data", str(data), "--out", str(out), *SMALL]) == 0
    assert (out / "model.pt").exists() and not (out / atomic.LOCK_NAME).exists()


def test_lock_folder_is_reentrant_in_one_process_and_cleans_up(tmp_path):
    folder = tmp_path / "new" / "out"
    lock = atomic.lock_folder(folder)
    with atomic.lock_folder(folder, "--out"):  # ld-ext demo holds its --out, its pre-training locks it again
        assert lock.path.exists()
    assert lock.path.exists()  # still held by the outer lock
    code = "import sys; from ld_ext.atomic import lock_folder; lock_folder(sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", code, str(folder)], env=_env(), capture_output=True, text=True, timeout=300)
    assert f"is in use by another ld-ext run (pid {os.getpid()} on host" in res.stderr
    lock.release()
    assert not folder.exists()  # created by the lock and left empty: removed again
    with atomic.lock_folder(tmp_path) as again:
        assert again.path.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "new"]


def test_other_commands_writing_an_out_folder_are_refused_while_it_is_held(tmp_path, capsys):
    out = tmp_path / "bench"
    with atomic.lock_folder(out):
        # the lock of this (pytest) process counts as another run for a new process only; so a child
        code = "import sys; from ld_ext.cli import main; sys.exit(main(sys.argv[1:]))"
        res = subprocess.run([sys.executable, "-c", code, "bench", "--quick", "--out", str(out)], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert _error_line(res.stderr).startswith(f"ld-ext: error: --out: {out} is in use by another ld-ext run (pid {os.getpid()}")
    assert not out.exists()


# ----------------------------------------------------------------------------- one error line


def test_nan_loss_is_one_error_line_with_the_step_and_a_hint(tmp_path, capsys, monkeypatch):
    real = LDObjective.__call__

    def nan_at_the_second_call(self, *a, **k):
        nan_at_the_second_call.calls += 1
        losses = real(self, *a, **k)
        if nan_at_the_second_call.calls == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    nan_at_the_second_call.calls = 0
    monkeypatch.setattr(LDObjective, "__call__", nan_at_the_second_call)
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(_pngs(tmp_path / "data")), "--out", str(out), *SMALL])
    line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith("ld-ext: error: the loss became nan at stage 2 epoch 1/1 step 1/1; try a lower --lr (now 0.001)")
    assert f"the last complete checkpoint is {out / 'checkpoint.pt'}" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_while_writing_into_out_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, code):
    class Full:
        """The temp file of a write into a full disk: the first bytes go, then the OSError."""

        def __init__(self, fd):
            self.f, self.n = os.fdopen(fd, "wb"), 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(code, os.strerror(code))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(atomic, "_open_temp", Full)
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(_pngs(tmp_path / "data")), "--out", str(out), *SMALL])
    line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert line.startswith(f"ld-ext: error: cannot write {out / 'checkpoint.pt'}: ")  # torch.save's RuntimeError undone
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".pt")]  # no half-written file
    assert not (out / atomic.LOCK_NAME).exists()


def test_atomic_write_turns_a_full_disk_into_a_disk_write_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic.atomic_write_text(tmp_path / "a.txt", "old")

    def full(f):
        f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.DiskWriteError, match=f"cannot write {path}: no space left on the device"):
        atomic.atomic_write(path, full)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ----------------------------------------------------------------------------- Ctrl-C at any time


def _torch_is_loading(pid: int) -> bool:
    try:
        return "torch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the child import torch")
@pytest.mark.parametrize("when", ["importing torch", 0.2, 1.0, 3.0, "training"])
def test_ctrl_c_at_any_time_is_one_line_and_exit_130(tmp_path, when):
    """A Ctrl-C (SIGINT to the process group, as a terminal sends it) while Python imports torch,
    0.2, 1 and 3 s after torch starts loading (imports, start-up, the cache), and while it trains
    (after the data summary): `ld-ext: interrupted`, exit 130, no traceback."""
    data = _pngs(tmp_path / "data", n=6)
    argv = [sys.executable, "-m", "ld_ext", "pretrain", "--data", str(data), "--out", str(tmp_path / "run"),
            *SMALL[:-2], "--workers", "2", "--epochs1", "500", "--steps-per-epoch", "50"]
    child = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=_sigint_default)
    try:
        _interrupt(child, when)
    finally:
        if child.poll() is None:  # never leave a training child behind (it would run for long)
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _sigint_default() -> None:
    """As a terminal starts a command: SIGINT at its default. A test run started in the background
    of a non-interactive shell inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt, rightly (a background job is not interrupted by Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(child: subprocess.Popen, when) -> None:
    t0 = time.time()
    seen = []
    if when != "training":
        # the fixed delays count from the moment torch starts loading (ld_ext's guard is in place by
        # then): a fixed delay from the start could land before Python has run any ld_ext code on a
        # loaded machine, where nothing but Python itself can answer the signal
        while not _torch_is_loading(child.pid) and child.poll() is None and time.time() - t0 < 60:
            time.sleep(0.005)
    if when == "training":
        for line in child.stderr:  # the summary is logged just before the first step
            seen.append(line)
            if line.startswith("data: training set"):
                break
        time.sleep(0.5)
    elif when != "importing torch":
        time.sleep(when)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    err = "".join(seen) + err
    # 130, or the end by SIGINT itself after the line was written (seen on a CI run: -2), which a
    # shell reports as 130 too
    assert child.returncode in (130, -signal.SIGINT), (child.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines()[-1].startswith("ld-ext: interrupted"), err
    if when == "training":
        assert err.splitlines()[-1] == "ld-ext: interrupted; no epoch was completed", err


def test_the_start_up_guard_is_the_commands_only():
    """`import ld_ext` in a program leaves its Ctrl-C alone; `python -m ld_ext` installs the guard."""
    code = "import signal, ld_ext; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=_sigint_default)
    assert res.stdout.strip() == "True", res.stderr
    # this (pytest) process, which imported ld_ext: its handler is whatever it had (default, or
    # ignored when started in the background), never one of ld_ext's
    handler = signal.getsignal(signal.SIGINT)
    assert handler in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL), handler


def test_the_start_up_guard_is_installed_before_any_other_import_of_the_package():
    """Issue 25: Ctrl-C in the first ~50 ms of `ld-ext` gave a traceback, since ld_ext/__init__.py
    imported logging (and cli imported argparse, json, ...) before the guard was in place. Now the
    guard module is the first module of the package imported, before logging and argparse, and it
    imports nothing new itself."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "ld_ext", "--version"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [line[len("import time:"):].split("|") for line in res.stderr.splitlines() if line.startswith("import time:")]
    rows = [(r[2].strip(), r[0].strip(), r[1].strip()) for r in rows[1:]]  # (module, self us, cumulative us)
    names = [r[0] for r in rows]
    first = names.index("ld_ext._startup")
    assert not [n for n in names[:first] if n.startswith("ld_ext")]
    assert "logging" not in names[:first] and "argparse" not in names[:first]
    # nothing imported under it: its cumulative time is its own
    assert rows[first][1] == rows[first][2], rows[first]


# ----------------------------------------------------------------------------- the data summary


def test_pretrain_logs_a_data_summary_before_training(tmp_path, capsys):
    import nibabel as nib

    data = _pngs(tmp_path / "data", n=3)
    np.save(data / "a.npy", np.random.default_rng(1).random((40, 40)).astype(np.float32))
    vol = np.zeros((40, 40, 6), np.float32)
    vol[5:35, 5:35, 1:5] = np.random.default_rng(2).random((30, 30, 4)) + 1  # slices 0 and 5 empty
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(data / "v.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 3), np.float32), np.eye(4)), str(data / "empty.nii.gz"))
    (data / "broken.png").write_bytes(b"not a png")
    bad = np.ones((40, 40), np.float32)
    bad[0, 0] = np.nan
    np.save(data / "nan.npy", bad)
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *SMALL]) == 0
    err = capsys.readouterr().err.splitlines()
    summary = [x for x in err if x.startswith("data: ")]
    assert summary == [
        "data: found 8 image(s) in 5 file(s): nifti 4 slices (1 file), png 3 images (3 files), npy 1 image (1 file)",
        f"data: skipped 1 file (UnidentifiedImageError 1); first: {data / 'broken.png'}",
        "data: skipped 1 image with NaN or infinite pixels",
        "data: 1 file gave no image (every slice of the volume below --min-foreground)",
        "data: training set: 8 images of 1x32x32",
    ], err
    first_epoch = next(i for i, x in enumerate(err) if x.startswith("stage 1 epoch"))
    assert err.index(summary[-1]) < first_epoch


# ----------------------------------------------------------------------------- --resume before the cache


def test_resume_without_or_with_a_mismatched_checkpoint_fails_before_the_cache_is_built(tmp_path, capsys):
    data, out = _pngs(tmp_path / "data"), tmp_path / "run"
    cache = tmp_path / "cache"
    rc = main(["pretrain", "--data", str(data), "--out", str(out), "--resume", "--cache", str(cache), *SMALL])
    assert rc == 2 and _error_line(capsys.readouterr().err) == (
        f"ld-ext: error: --resume: no checkpoint to resume from at {out / 'checkpoint.pt'}")
    assert not cache.exists() and not out.exists()
    assert main(["pretrain", "--data", str(data), "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    for extra, words in ((["--emb-dim", "6"], "was trained with emb_dim=8, this run asks for 6"),
                         (["--fit", "crop"], "was trained with fit='pad', this run asks for 'crop'")):
        rc = main(["pretrain", "--data", str(data), "--out", str(out), "--resume", "--cache", str(cache), *SMALL, *extra])
        assert rc == 2 and words in _error_line(capsys.readouterr().err)
        assert not cache.exists()
    other = _pngs(tmp_path / "other", seed=5)
    rc = main(["pretrain", "--data", str(other), "--out", str(out), "--resume", "--cache", str(cache), *SMALL])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and f"was trained on --data {data.resolve()}, this run gives --data {other.resolve()}" in line
    assert not cache.exists()
    # the same folder with one image more: the cache is rebuilt, then the count differs
    _pngs(data, n=5)
    rc = main(["pretrain", "--data", str(data), "--out", str(out), "--resume", *SMALL])
    assert rc == 2 and "was trained on 4 images, --data now gives 5" in _error_line(capsys.readouterr().err)


def test_the_checkpoint_records_the_data_it_was_trained_on(tmp_path):
    from ld_ext.checkpoint import load_checkpoint

    data, out = _pngs(tmp_path / "data"), tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), *SMALL]) == 0
    rec = load_checkpoint(out / "checkpoint.pt")["data"]
    assert rec["paths"] == [str(data.resolve())] and rec["n_images"] == 4 and len(rec["fingerprint"]) >= 15


def test_an_lr_so_large_that_adam_overflows_is_refused_before_anything_runs(tmp_path, capsys):
    """--lr 1e38 passed the check and then ended in torch's 'value cannot be converted to type float
    without overflow' traceback inside Adam's first step."""
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(_pngs(tmp_path / "data")), "--out", str(out), *SMALL, "--lr", "1e38"]) == 2
    assert capsys.readouterr().err == "ld-ext: error: --lr must be a number in (0, 1000], got 1e+38\n"
    assert not out.exists()


def test_data_summary_of_an_in_memory_data_set_and_of_dicom_frames():
    from ld_ext.pretrain.outputs import data_summary

    class Frames:
        names = ["/d/a.dcm:frame0", "/d/a.dcm:frame1", "/d/b.DCM", "/d/x.png", "/d/v.nii.gz:axis2:3"]
        skipped = [("/d/fifo", "not a regular file (not opened)")]
        nonfinite, n_upsampled, meta = [], 2, {"n_files": 4}

        def __len__(self):
            return 5

    assert data_summary(Frames(), 64, 1) == [
        "data: found 5 image(s) in 4 file(s): dicom 3 frames (2 files), png 1 image (1 file), nifti 1 slice (1 file)",
        "data: skipped 1 file (not a regular file (not opened) 1); first: /d/fifo",
        "data: training set: 5 images of 1x64x64; 2 smaller than 64x64, upsampled",
    ]


def test_a_task_out_inside_a_data_folder_is_never_read_as_images(tmp_path):
    """probe/finetune/shape-guided/demo/bench mark their --out: PNGs a task writes into a folder
    inside a data folder are not discovered by a later scan of that data folder."""
    import argparse

    from ld_ext import cli, data

    d = _pngs(tmp_path / "d", n=3)
    before = data.scan_image_files(d).files
    for command in cli.LOCKED_OUT:
        out = d / f"{command}_out"
        with cli._out_lock(argparse.Namespace(command=command, out=str(out))):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(out / "overlay.png")
        assert (out / "overlay.png").exists()
    assert data.scan_image_files(d).files == before
    # an unmarked folder with the same content is scanned (the check above can fail)
    (d / "other").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "other" / "overlay.png")
    assert len(data.scan_image_files(d).files) == len(before) + 1
