"""The image cache never feeds damaged, stale or self-produced images to training: per-image
checksums, the seal of meta.json, source identity (size, mtime, ctime, inode), outputs excluded
from discovery, and the build lock's bounded wait."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ld_ext import data, train
from ld_ext.bench import synthetic_images
from ld_ext.data import cache as cache_mod
from ld_ext.data import cachelock

S = 32


def _folder(root, n=6, fmt="png"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = rng.integers(0, 255, (40, 48), dtype=np.uint8)
        if fmt == "png":
            Image.fromarray(im).save(root / f"img{i}.png")
        else:
            np.save(root / f"img{i}.npy", im.astype(np.float32))
    return root


def _build(tmp_path, **kw):
    return data.open_or_build_cache(tmp_path / "d", data.Preprocessing(S), tmp_path / "c", workers=0, progress=False, **kw)


def _overwrite(path, values):
    n = path.stat().st_size // 4
    path.write_bytes(np.broadcast_to(np.asarray(values, np.float32), (n,)).astype(np.float32).tobytes())


DAMAGES = {
    "random floats": lambda n: np.random.default_rng(1).random(n),
    "1e30": lambda n: np.full(n, 1e30),
    "zeros": lambda n: np.zeros(n),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_images_overwritten_at_the_same_size_are_rebuilt_not_trained_on(tmp_path, damage, caplog):
    _folder(tmp_path / "d")
    c = _build(tmp_path)
    good = c.read(range(6)).clone()
    root, f32 = c.root, c.root / "images.f32"
    del c
    size = f32.stat().st_size
    _overwrite(f32, DAMAGES[damage](size // 4))
    assert f32.stat().st_size == size
    with pytest.raises(data.CacheIntegrityError, match="images.f32"):
        data.CachedImageDataset(root)
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        again = _build(tmp_path)
    assert any("is damaged and is rebuilt" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.read(range(6)), good)


def test_an_image_damaged_beyond_the_sample_stops_the_run_at_its_first_read_and_the_next_run_rebuilds(
    tmp_path, monkeypatch, caplog
):
    # a large cache is checked in full only image by image, on each image's first read
    monkeypatch.setattr(cache_mod, "_FULL_VERIFY_BYTES", 0)
    monkeypatch.setattr(cache_mod, "_SAMPLE_VERIFY", 2)  # images 0 and 5 at open
    _folder(tmp_path / "d")
    c = _build(tmp_path)
    good = c.read(range(6)).clone()
    root, item = c.root, S * S * 4
    del c
    with open(root / "images.f32", "r+b") as fh:
        fh.seek(3 * item)
        fh.write(np.zeros(S * S, np.float32).tobytes())
    c = _build(tmp_path)  # the sample passes
    assert c.root == root and torch.equal(c.read([0, 1, 2, 4, 5]), good[[0, 1, 2, 4, 5]])
    with pytest.raises(data.CacheIntegrityError, match=r"images\.f32: image 3 .*next run rebuilds it") as ei:
        c.read([2, 3])
    assert "\n" not in str(ei.value) and (root / "DAMAGED").exists()
    # also through DataLoader worker processes: the same one-line error in the training process
    loader = torch.utils.data.DataLoader(c, batch_size=6, num_workers=1)
    with pytest.raises(data.CacheIntegrityError) as ei:
        next(iter(loader))
    assert "\n" not in str(ei.value) and str(ei.value).startswith("image cache file ")
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        again = _build(tmp_path)
    assert any("marked damaged" in r.getMessage() for r in caplog.records), caplog.text
    assert torch.equal(again.read(range(6)), good) and not (root / "DAMAGED").exists()


@pytest.mark.parametrize("edit", ["n lowered, images cut to match", "n lowered, index and images cut to match"])
def test_a_cache_edited_to_look_consistent_is_rebuilt(tmp_path, edit, caplog):
    _folder(tmp_path / "d")
    c = _build(tmp_path)
    root = c.root
    del c
    meta = json.loads((root / "meta.json").read_text())
    meta["n"] = 3
    (root / "meta.json").write_text(json.dumps(meta))
    with open(root / "images.f32", "r+b") as fh:
        fh.truncate(3 * S * S * 4)
    with open(root / "images.crc32", "r+b") as fh:
        fh.truncate(3 * 4)
    if edit.startswith("n lowered, index"):
        index = json.loads((root / "index.json").read_text())
        index["items"] = index["items"][:3]
        (root / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        again = _build(tmp_path)
    assert any("is damaged and is rebuilt" in r.getMessage() for r in caplog.records), caplog.text
    assert len(again) == 6


@pytest.mark.parametrize("replacement", ["another image", "random bytes"])
def test_a_source_replaced_with_the_same_size_and_mtime_gives_a_new_cache(tmp_path, replacement):
    d = _folder(tmp_path / "d", fmt="npy")  # an .npy of the same shape has the same size
    c = _build(tmp_path)
    old = c.read(range(6)).clone()
    f = d / "img2.npy"
    st = f.stat()
    if replacement == "another image":
        np.save(tmp_path / "new.npy", np.random.default_rng(9).random((40, 48)).astype(np.float32))
        new = (tmp_path / "new.npy").read_bytes()
    else:
        new = np.random.default_rng(5).integers(0, 256, st.st_size, dtype=np.uint8).tobytes()
    f.write_bytes(new)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    if replacement == "another image":
        again = _build(tmp_path)
        assert again.root != c.root and len(again) == 6
        assert torch.equal(again.read([0, 1, 3, 4, 5]), old[[0, 1, 3, 4, 5]]) and not torch.equal(again[2], old[2])
    else:
        with pytest.warns(RuntimeWarning, match="unreadable"):
            again = _build(tmp_path)
        assert again.root != c.root and len(again) == 5 and "img2.npy" in again.skipped[0][0]
    assert again.fingerprint == c.fingerprint  # the node-independent key (path, size, mtime) is unchanged


def test_a_cache_whose_source_list_differs_from_the_folder_is_rebuilt(tmp_path, caplog):
    _folder(tmp_path / "d")
    c = _build(tmp_path)
    root = c.root
    del c
    monkey_scan = data.scan_image_files(tmp_path / "d")
    monkey_scan.inodes[0] += 1  # as if the index had been written for other files
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        assert cache_mod._open_intact(root, monkey_scan) is None
    assert "first that differs" in caplog.text and "img0.png" in caplog.text


# ----------------------------------------------------------------------------- outputs never inputs


def test_excluded_folders_and_files_are_never_discovered(tmp_path):
    d = _folder(tmp_path / "d", 3)
    (d / "out" / "overlays").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "out" / "overlays" / "stage1_epoch001.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "losses.png")
    assert len(data.scan_image_files(d).files) == 5
    assert len(data.scan_image_files(d, exclude=[d / "out"]).files) == 4
    # --out the data folder itself: the folder is still read, its outputs are not
    scan = data.scan_image_files(d, exclude=[d, d / "out" / "overlays", d / "losses.png"])
    assert [f.name for f in scan.files] == ["img0.png", "img1.png", "img2.png"]
    # through a link or a relative path: the same folder
    os.symlink(d / "out", tmp_path / "link")
    assert len(data.scan_image_files(d, exclude=[tmp_path / "link"]).files) == 4
    # a given file is always read; a missing excluded path excludes nothing
    assert len(data.scan_image_files(d / "losses.png", exclude=[d]).files) == 1
    assert len(data.scan_image_files(d, exclude=[tmp_path / "nope"]).files) == 5
    assert len(data.ImageFolderDataset(d, size=S, progress=False, exclude=[d / "out"])) == 4


def test_folders_marked_as_outputs_are_skipped(tmp_path):
    d = _folder(tmp_path / "d", 2)
    run = d / "run"
    (run / "overlays").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "overlays" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "losses.png")
    assert len(data.scan_image_files(d).files) == 4
    data.mark_output_folder(run, ("overlays", "losses.png"))
    assert (run / data.OUTPUT_MARKER).exists()
    assert [f.name for f in data.scan_image_files(d).files] == ["img0.png", "img1.png"]
    # the marked folder given as data: read, without its listed outputs
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(run / "mine.png")
    assert [f.name for f in data.scan_image_files(run).files] == ["mine.png"]


def test_out_and_cache_inside_data_are_not_trained_on_by_the_next_run(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i, im in enumerate(synthetic_images(12, S, seed=2)):
        Image.fromarray((im[0].numpy() * 255).astype(np.uint8)).save(d / f"im{i:02d}.png")
    kw = dict(size=S, emb_dim=8, n_clusters=4, widths=(4, 8, 8, 8, 8), batch_size=2, epochs1=1, epochs2=1)
    kw.update(steps_per_epoch=1, val_images=2, progress=False, seed=3, device="cpu", workers=0, data=[str(d)])
    first = train.pretrain(train.TrainConfig(out=str(d / "run"), **kw))
    assert first["n_images"] == 12 and list((d / "run" / "overlays").glob("*.png"))
    second = train.pretrain(train.TrainConfig(out=str(d / "run2"), cache=str(d / "shared_cache"), **kw))
    assert second["n_images"] == 12
    third = train.pretrain(train.TrainConfig(out=str(d), overwrite=True, **kw))  # --out the data folder
    assert third["n_images"] == 12


# ----------------------------------------------------------------------------- the build lock


def test_a_frozen_lock_holder_is_named_and_the_wait_ends(tmp_path, caplog):
    path = tmp_path / ".x.lock"
    lines = []
    with cachelock.CacheLock(path) as held:
        held.beat("building the cache", 3, 10, force=True)
        t0 = time.monotonic()
        with pytest.raises(data.CacheLockTimeout) as ei:
            with cachelock.CacheLock(path, timeout=0.6, log=lines.append):
                pass
        assert 0.5 < time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert str(path) in msg and f"pid {os.getpid()} on host " in msg and "3/10 files" in msg and "\n" not in msg
    assert len(lines) == 1 and lines[0].startswith(f"waiting for the image cache lock {path}, held by pid {os.getpid()}")
    with cachelock.CacheLock(path, timeout=0.6):  # released: taken at once
        pass
    assert path.read_text() == ""
    with pytest.raises(ValueError, match="lock_timeout"):
        cachelock.CacheLock(path, timeout=0)


def test_a_lock_holder_that_makes_progress_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cachelock, "_BEAT_S", 0.05)
    path = tmp_path / ".x.lock"
    taken = threading.Event()

    def hold():
        with cachelock.CacheLock(path) as lock:
            taken.set()
            for k in range(30):  # 1.5 s in all, far beyond the waiter's 0.5 s without progress
                time.sleep(0.05)
                lock.beat("building the cache", k, 30)

    t = threading.Thread(target=hold)
    t.start()
    taken.wait(10)
    t0 = time.monotonic()
    with cachelock.CacheLock(path, timeout=0.5, log=lambda s: None):
        waited = time.monotonic() - t0
    t.join()
    assert waited > 1.0


def test_open_or_build_cache_and_a_multi_process_start_do_not_wait_forever(tmp_path, monkeypatch):
    _folder(tmp_path / "d")
    scan = data.scan_image_files(tmp_path / "d", exclude=[tmp_path / "c"])
    name = cache_mod._folder_name(cache_mod._cache_key(scan, data.Preprocessing(S)), scan)
    (tmp_path / "c").mkdir()
    with cachelock.CacheLock(tmp_path / "c" / f".{name}.lock"):  # a builder that froze
        with pytest.raises(data.CacheLockTimeout, match=r"\.lock: held by pid"):
            _build(tmp_path, lock_timeout=0.5)
        # a torchrun process waits for rank 0's build no longer than --dist-timeout: the process group
        # is joined first (here: a stand-in for one process of two), then the cache is opened
        from ld_ext.pretrain import loop

        real_init = loop.dist_utils.init_from_env

        def init_one_of_two(device=None, timeout=None):
            monkeypatch.delenv("WORLD_SIZE")
            info = real_init(device, timeout)
            monkeypatch.setenv("WORLD_SIZE", "2")
            return info

        monkeypatch.setattr(loop.dist_utils, "init_from_env", init_one_of_two)
        monkeypatch.setenv("WORLD_SIZE", "2")
        cfg = train.TrainConfig(
            out=str(tmp_path / "o"), data=[str(tmp_path / "d")], cache=str(tmp_path / "c"), size=S, progress=False,
            workers=0, dist_timeout=0.5, device="cpu",
        )
        with pytest.raises(data.CacheLockTimeout, match="no progress for 0.5 s"):
            train.pretrain(cfg)
        # one process: --cache-lock-timeout (the default waits DEFAULT_LOCK_TIMEOUT_S)
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setattr(loop.dist_utils, "init_from_env", real_init)
        cfg = train.TrainConfig(
            out=str(tmp_path / "o1"), data=[str(tmp_path / "d")], cache=str(tmp_path / "c"), size=S,
            progress=False, workers=0, cache_lock_timeout=0.7, device="cpu",
        )
        with pytest.raises(data.CacheLockTimeout, match="no progress for 0.7 s"):
            train.pretrain(cfg)
    assert train.TrainConfig().cache_lock_timeout == data.DEFAULT_LOCK_TIMEOUT_S


# ----------------------------------------------------------------------------- every refusal, word for word


def _reseal(root):
    """meta.json sealed again over the index and checksums as they are now (an edit made to look consistent)."""
    meta = json.loads((root / "meta.json").read_text())
    meta["seal"] = cache_mod.cache_seal(meta, (root / "index.json").read_bytes(), (root / f"{_stem(root)}.crc32").read_bytes())
    (root / "meta.json").write_text(json.dumps(meta))


def _stem(root):
    """"volumes" in a volume cache's folder, "images" in an image cache's (their files' names)."""
    return "volumes" if root.name.startswith("ld_ext-volumes-") else "images"


def _both_caches(tmp_path):
    """An image cache of 6 images and a volume cache of 2 volumes: kind -> (root, opener, n, data file)."""
    _folder(tmp_path / "d")
    img = _build(tmp_path).root
    (tmp_path / "v").mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        np.save(tmp_path / "v" / f"vol{i}.npy", rng.random((5, 6, 4 + i)).astype(np.float32))
    vol = data.open_or_build_volume_cache(tmp_path / "v", cache=tmp_path / "vc").root
    return {"image": (img, data.CachedImageDataset, 6), "volume": (vol, data.VolumePatchDataset, 2)}


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    obj = edit(obj)
    path.write_text(json.dumps(obj))


def _cut(path, nbytes):
    with open(path, "r+b") as fh:
        fh.truncate(nbytes)


def _set(key, value):
    def edit(d):
        d[key] = value
        return d

    return edit


def _drop(key):
    def edit(d):
        del d[key]
        return d

    return edit


def _index_one_short(root, kind):
    listed = "volumes" if kind == "volume" else "items"  # what the index lists, one entry per image/volume
    _edit_json(root / "index.json", lambda d: {**d, listed: d[listed][1:]})


NOFILE = "[Errno 2] No such file or directory: '{root}/{file}'"
SEAL = "{what} {root}: meta.json, index.json and {stem}.crc32 do not match the seal written when it was built (edited or damaged since)"
REFUSALS = {  # damage: (how, image cache's error, volume cache's error)
    "meta missing": (
        lambda r, k: (r / "meta.json").unlink(),
        "not an ld_ext image cache (no readable meta.json): {root} (" + NOFILE.format(root="{root}", file="meta.json") + ")",
        "not an ld_ext volume cache (no readable meta.json): {root} (" + NOFILE.format(root="{root}", file="meta.json") + ")",
    ),
    "meta a list": (
        lambda r, k: (r / "meta.json").write_text("[1, 2]"),
        "image cache {root}: meta.json holds a list, not a dict",
        "not an ld_ext volume cache (meta.json does not say kind 'volumes'): {root}",
    ),
    "meta of another version": (
        lambda r, k: _edit_json(r / "meta.json", _set("version", 99)),
        "image cache {root} has version 99, expected 2",
        "volume cache {root} has version 99, expected 1",
    ),
    "meta without its seal": (
        lambda r, k: _edit_json(r / "meta.json", _drop("seal")),
        "image cache {root}: meta.json is malformed ('seal')",
        "volume cache {root}: meta.json is malformed ('seal')",
    ),
    "meta n a string": (
        lambda r, k: _edit_json(r / "meta.json", _set("n", "6")),
        "image cache {root}: meta.json is malformed (n must be an int >= 0, got '6')",
        "volume cache {root}: meta.json is malformed (n must be an int >= 0, got '6')",
    ),
    "index missing": (
        lambda r, k: (r / "index.json").unlink(),
        "image cache {root}: index.json cannot be read (" + NOFILE.format(root="{root}", file="index.json") + ")",
        "volume cache {root}: index.json or volumes.crc32 cannot be read ("
        + NOFILE.format(root="{root}", file="index.json") + ")",
    ),
    "checksums missing": (
        lambda r, k: (r / f"{_stem(r)}.crc32").unlink(),
        "image cache {root}: images.crc32 cannot be read (" + NOFILE.format(root="{root}", file="images.crc32") + ")",
        "volume cache {root}: index.json or volumes.crc32 cannot be read ("
        + NOFILE.format(root="{root}", file="volumes.crc32") + ")",
    ),
    "index a list": (
        lambda r, k: (r / "index.json").write_text("[]"),
        "image cache {root}: index.json holds a list, not a dict",
        SEAL,
    ),
    "index a list, resealed": (
        lambda r, k: ((r / "index.json").write_text("[]"), _reseal(r)),
        "image cache {root}: index.json holds a list, not a dict",
        "volume cache {root}: index.json does not list the 2 volumes of the meta",
    ),
    "index one short": (
        _index_one_short,
        "image cache {root}: meta.json says 6 images, index.json lists 5; delete {root} to rebuild it",
        SEAL,
    ),
    "index one short, resealed": (
        lambda r, k: (_index_one_short(r, k), _reseal(r)),
        "image cache {root}: meta.json says 6 images, index.json lists 5; delete {root} to rebuild it",
        "volume cache {root}: index.json does not list the 2 volumes of the meta",
    ),
    "checksums cut": (
        lambda r, k: _cut(r / f"{_stem(r)}.crc32", 4),
        "image cache {root}: images.crc32 has 4 bytes, expected 24",
        SEAL,
    ),
    "checksums cut, resealed": (
        lambda r, k: (_cut(r / f"{_stem(r)}.crc32", 4), _reseal(r)),
        "image cache {root}: images.crc32 has 4 bytes, expected 24",
        "volume cache {root}: volumes.crc32 has 4 bytes, expected 8",
    ),
    "data cut": (
        lambda r, k: _cut(r / f"{_stem(r)}.f32", 7),
        "image cache {root}/images.f32 has 7 bytes, expected " + str(6 * S * S * 4) + "; delete {root} to rebuild it",
        "volume cache {root}/volumes.f32 has 7 bytes, expected " + str(4 * 5 * 6 * 9) + "; delete {root} to rebuild it",
    ),
    "marked damaged": (
        lambda r, k: (r / "DAMAGED").write_text("image 3 failed\n"),
        "image cache {root} was marked damaged during a run: image 3 failed",
        "volume cache {root} was marked damaged during a run: image 3 failed",
    ),
    "data overwritten": (
        lambda r, k: _overwrite(r / f"{_stem(r)}.f32", 0.5),
        "image cache file {root}/images.f32: image 0 does not match the checksum written when the cache was built "
        "(changed or damaged since)",
        "volume cache file {root}/volumes.f32: volume 0 ({names[0]}) does not match the checksum written when the "
        "cache was built (changed or damaged since)",
    ),
}


@pytest.mark.parametrize("damage", list(REFUSALS))
@pytest.mark.parametrize("kind", ["image", "volume"])
def test_each_damage_is_refused_with_its_own_words(tmp_path, kind, damage):
    """The exact error of every damage at open, for the image cache and the volume cache (which share
    the mechanics of meta, index, seal and checksums but word some refusals differently)."""
    root, opener, n = _both_caches(tmp_path)[kind]
    names = opener(root).names if kind == "volume" else []
    how, *words = REFUSALS[damage]
    how(root, kind)
    what = f"{kind} cache"
    want = words[kind == "volume"].format(root=root, what=what, stem=_stem(root), names=names)
    with pytest.raises(ValueError) as e:
        opener(root)
    assert str(e.value) == want


@pytest.mark.parametrize("kind", ["image", "volume"])
def test_a_damage_found_during_a_run_and_a_changed_source_list_are_worded_as_before(tmp_path, kind, caplog):
    root, opener, n = _both_caches(tmp_path)[kind]
    ds = opener(root)
    ds._verified[:] = False  # as if nothing had been checked at open
    f32 = root / f"{_stem(root)}.f32"
    good = f32.read_bytes()
    _overwrite(f32, 0.5)
    with pytest.raises(data.CacheIntegrityError) as e:
        ds.read([0]) if kind == "image" else ds.read_patch(0, (0, 0, 0), (1, 1, 1))
    label = "image 0" if kind == "image" else f"volume 0 ({ds.names[0]})"
    assert str(e.value) == (
        f"{kind} cache file {root}/{_stem(root)}.f32: {label} does not match the checksum written when the cache was "
        "built (changed or damaged since); the cache is marked damaged and the next run rebuilds it"
    )
    assert (root / "DAMAGED").read_text().startswith(f"{label.split(' (')[0]} does not match its checksum (")
    # a cache sealed over another list of source files: rebuilt with a warning that says so
    (root / "DAMAGED").unlink()
    f32.write_bytes(good)
    _edit_json(root / "index.json", lambda d: {**d, "files": d["files"][1:]})
    _reseal(root)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        if kind == "image":
            again = _build(tmp_path)
        else:
            again = data.open_or_build_volume_cache(tmp_path / "v", cache=tmp_path / "vc")
    first = tmp_path / ("d/img0.png" if kind == "image" else "v/vol0.npy")
    detail = (
        f"it lists 5 source file(s), the data folder holds 6; first that differs: {first}"
        if kind == "image"
        else "it lists 1 source file(s), the data holds 2 (or others)"
    )
    assert [r.getMessage() for r in caplog.records] == [f"the {kind} cache {root} is damaged and is rebuilt: {detail}"]
    assert again.root == root and len(again) == n


def test_cache_keys_and_folder_names_are_those_of_the_caches_already_on_disk():
    """The fingerprint and the folder name of a fixed file list, as every earlier build computed them:
    a change here would leave every existing cache unused (each data set silently built again)."""
    from pathlib import Path

    from ld_ext.data import volume_cache as vc_mod
    from ld_ext.data.readers import FileScan
    from ld_ext.data.volumes import VolumeScan

    files = FileScan([Path("scans/a.png"), Path("scans/b ü.dcm")], [100, 2048], [1_700_000_000_000_000_001, 5], [],
                     [7, 8], [11, 12])
    key = cache_mod._cache_key(files, data.Preprocessing(32))
    assert key == "09a1bf9feba7cf1e7557bdc880ad03de23643286833bd7d110715bab8f2798c0"
    assert cache_mod._folder_name(key, files) == "ld_ext-cache-581ba13a0052ae81305740bf"
    volumes = VolumeScan([Path("scans/a.png"), Path("scans/b ü.dcm")], [[0], [1]], files)
    key = vc_mod._cache_key(volumes, data.check_volume_settings((1.5, 1.5, 2.0), (-1000, 400), (0.5, 99.5)))
    assert key == "bb5d7da59e6477e9e99d4cac5d35d0722b28ff9c2582bd296960e11ca2452b51"
    assert vc_mod._folder_name(key, volumes) == "ld_ext-volumes-7a1ece56e5486b9df1e9f7fe"
