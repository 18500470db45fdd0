"""Checkpoint files that would make the loader allocate, run for hours or crash: each is refused with
one message naming the file, before anything large is allocated (issue 25, item 2)."""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from ld_ext import checkpoint as ckpt
from ld_ext.models import LDNet

SMALL = [4, 4, 8, 8, 8]
BIG = {"in_channels": 1, "emb_dim": 32, "n_clusters": 16, "widths": [8192] * 5}  # ~47 GiB of float32


@pytest.fixture(scope="module")
def good():
    torch.manual_seed(0)
    net = LDNet(1, 6, 3, SMALL)
    return {"format": ckpt.FORMAT, "version": 1, "config": net.config, "model": net.state_dict()}


def _meta_state(cfg: dict) -> dict:
    with torch.device("meta"):
        return LDNet(**cfg).state_dict()


def _zero_element_bomb(with_config: bool) -> dict:
    """Tensors without a single element whose shapes name a network of 8192 channels (or an
    embedding of 10**7 channels): no stride-0 view, nothing for the storage check to see."""
    if not with_config:
        torch.manual_seed(0)
        sd = LDNet(1, 6, 3, SMALL).state_dict()
        sd["decoder.emb_head.1.weight"] = torch.zeros(10**7, 0, 1, 1)
        return sd
    sd = {k: torch.zeros((0,) + tuple(v.shape[1:]), dtype=v.dtype) if v.dim() else torch.zeros((), dtype=v.dtype)
          for k, v in _meta_state(BIG).items()}
    for g in range(5):  # the shapes infer_config reads agree with the config
        sd[f"encoder.groups.{g}.0.0.weight"] = torch.zeros(8192, 1 if g == 0 else 8192, 0, 3)
    sd["decoder.emb_head.1.weight"] = torch.zeros(32, 0, 1, 1)
    sd["decoder.cluster_head.1.weight"] = torch.zeros(16, 0, 1, 1)
    return {"config": BIG, "model": sd}


def _deflated(path, good, pad_bytes: int) -> None:
    """A checkpoint whose records are compressed: torch.load inflates them (zeros compress ~1000:1)."""
    plain = path.with_suffix(".plain")
    torch.save({**good, "pad": torch.zeros(pad_bytes // 4)}, plain)
    with zipfile.ZipFile(plain) as zi, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    plain.unlink()


def _overlapping(src, dst, copies: int) -> None:
    """``src`` with its largest record listed ``copies`` more times in the central directory, each
    entry pointing at the same bytes (a file that declares more than it holds)."""
    data = bytearray(src.read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    n, cd_size, cd_off = struct.unpack("<HII", data[eocd + 10 : eocd + 20])
    entries, pos = [], cd_off
    for _ in range(n):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        end = pos + 46 + name_len + extra_len + comment_len
        entries.append(bytes(data[pos:end]))
        pos = end
    biggest = max(entries, key=lambda e: struct.unpack("<I", e[24:28])[0])
    name_len = struct.unpack("<H", biggest[28:30])[0]
    extra = []
    for i in range(copies):
        name = f"archive/extra/{i:06d}".encode().ljust(name_len, b"_")[:name_len]
        extra.append(biggest[:46] + name + biggest[46 + name_len :])
    cd = b"".join(entries + extra)
    tail = bytearray(data[eocd:])
    tail[8:20] = struct.pack("<HHII", n + copies, n + copies, len(cd), cd_off)
    dst.write_bytes(bytes(data[:cd_off]) + cd + bytes(tail))


def test_compressed_records_are_refused_before_reading(tmp_path, good):
    path = tmp_path / "deflated.pt"
    _deflated(path, good, 64 * 2**20)  # 64 MB of zeros in about 70 KB (1 GB would fit in 1 MB)
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"deflated\.pt: its record '.*' is compressed; torch\.save stores"):
        ckpt.load_checkpoint(path)


def test_records_that_overlap_are_refused(tmp_path, good):
    src, path = tmp_path / "src.pt", tmp_path / "overlap.pt"
    torch.save(good, src)
    _overlapping(src, path, copies=20)
    assert len(zipfile.ZipFile(path).infolist()) == len(zipfile.ZipFile(src).infolist()) + 20
    with pytest.raises(ValueError, match=r"overlap\.pt: its records declare [\d,]+ bytes, more than the file's"):
        ckpt.load_checkpoint(path)


def test_old_non_zip_format_is_refused_naming_it(tmp_path, good):
    path = tmp_path / "legacy.pt"
    torch.save(good, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy\.pt: it is in the format torch\.save wrote before PyTorch 1\.6"):
        ckpt.load_checkpoint(path)


def test_code_in_the_file_is_named_not_called_damage(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "e": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: it would call posix\.system while being loaded"):
        ckpt.load_checkpoint(path)


def test_shared_references_are_walked_once(tmp_path, good):
    """A 2 KB pickle can hold 2**40 paths to one list; the check used to walk every path (hours)."""
    x = [torch.zeros(1)]
    for _ in range(40):
        x = [x, x]
    path = tmp_path / "laughs.pt"
    torch.save({**good, "extra": x}, path)
    code = f"from ld_ext.checkpoint import load_checkpoint; load_checkpoint({str(path)!r}); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_deep_nesting_and_too_many_objects_are_refused(tmp_path, good, monkeypatch):
    y = cur = []
    for _ in range(3000):
        cur.append([])
        cur = cur[0]
    path = tmp_path / "deep.pt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for torch.save's pickler
    try:
        torch.save({**good, "extra": y}, path)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ValueError, match=r"deep\.pt: extra(\[0\])+\[0?\.\.\. is nested more than 100 levels deep"):
        ckpt.load_checkpoint(path)  # was a RecursionError (a traceback in the CLI)
    path = tmp_path / "many.pt"
    torch.save({**good, "extra": list(range(50))}, path)
    monkeypatch.setattr(ckpt, "MAX_OBJECTS", 40)
    with pytest.raises(ValueError, match=r"many\.pt holds more than 40 objects"):
        ckpt.load_checkpoint(path)


def test_sparse_tensors_and_tensor_keys_are_checked(tmp_path, good):
    sd = dict(good["model"])
    w = sd["decoder.emb_head.1.weight"]
    sd["decoder.emb_head.1.weight"] = torch.sparse_coo_tensor(
        torch.zeros(4, 0, dtype=torch.long), torch.zeros(0), (10**7, *w.shape[1:])
    )
    path = tmp_path / "sparse.pt"
    torch.save({**good, "model": sd}, path)
    with pytest.raises(ValueError, match=r"sparse\.pt: tensor model\.decoder\.emb_head\.1\.weight is a sparse_coo tensor"):
        ckpt.load_checkpoint(path)  # was NotImplementedError, a traceback
    path = tmp_path / "key.pt"
    torch.save({**good, "optimizer": {"state": {torch.zeros(1).expand(10**9): {}}}}, path)
    with pytest.raises(ValueError, match=r"key\.pt: tensor optimizer\.state\[key Tensor\] .* declares"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("with_config", [False, True])
def test_zero_element_tensors_naming_a_huge_network_are_refused(tmp_path, with_config):
    path = tmp_path / "zero.pt"
    torch.save(_zero_element_bomb(with_config), path)
    words = "does not match the LDNet it describes ('model'): shape" if with_config else "emb_dim must be in [1, 8192]"
    with pytest.raises(ValueError) as info:
        ckpt.load_model(path)
    assert str(path) in str(info.value) and words in str(info.value), info.value


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda sd: sd["decoder.emb_head.1.weight"].fill_(float("nan")), "holds NaN or infinite values"),
        (lambda sd: sd["encoder.groups.0.0.1.running_var"].fill_(float("inf")), "holds NaN or infinite values"),
        (lambda sd: sd.__setitem__("decoder.emb_head.1.bias", sd["decoder.emb_head.1.bias"].to(torch.complex64)),
         "is of type torch.complex64, expected real numbers"),
        (lambda sd: sd.__setitem__("decoder.emb_head.1.bias", sd["decoder.emb_head.1.bias"].to(torch.int32)),
         "torch.int32 in the file, a floating-point type expected"),
        (lambda sd: sd.__setitem__("decoder.extra", torch.zeros(2)), "unexpected ['decoder.extra']"),
    ],
    ids=["nan", "inf", "complex", "int", "extra-key"],
)
def test_weights_of_the_wrong_kind_are_refused(tmp_path, good, change, words):
    sd = {k: v.clone() for k, v in good["model"].items()}
    change(sd)
    path = tmp_path / "w.pt"
    torch.save({**good, "model": sd}, path)
    with pytest.raises(ValueError) as info:
        ckpt.load_model(path)
    assert str(info.value).startswith(f"checkpoint {path}") and words in str(info.value), info.value


def test_half_precision_weights_still_load(tmp_path, good):
    path = tmp_path / "half.pt"
    torch.save({**good, "model": {k: v.half() if v.is_floating_point() else v for k, v in good["model"].items()}}, path)
    assert ckpt.load_model(path).config == good["config"]


_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))  # a runaway allocation fails, not the machine
from ld_ext.checkpoint import load_model
try:
    load_model({path!r})
except ValueError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("case", ["zero-element", "zero-element-config", "sparse"])
def test_small_bombs_stay_small_in_a_child_process(tmp_path, case):
    """No allocation above 1.5 GB for a checkpoint under 1 MB (peak RSS of a child process)."""
    from ld_ext.bench.memory import child_peak_rss

    path = tmp_path / f"{case}.pt"
    if case.startswith("zero-element"):
        torch.save(_zero_element_bomb(case.endswith("config")), path)
    else:
        sd = {k: torch.sparse_coo_tensor(torch.zeros(v.dim(), 0, dtype=torch.long), torch.zeros(0), v.shape)
              if v.dim() else torch.zeros((), dtype=v.dtype) for k, v in _meta_state(BIG).items()}
        torch.save({"config": BIG, "model": sd}, path)
    assert path.stat().st_size < 1_000_000, path.stat().st_size
    rc, peak, err = child_peak_rss([sys.executable, "-c", textwrap.dedent(_CHILD.format(path=str(path)))])
    assert rc == 3 and str(path) in err, err[-3000:]
    assert peak < 1.5e9, peak


def test_resume_state_is_checked_before_use(tmp_path):
    """--resume's checkpoint.pt: weights, train_config and world_size checked; a check that trips
    on an odd entry is an error naming the file, not a traceback."""
    from ld_ext.pretrain.state import load_for_all, validate_resume_state

    torch.manual_seed(0)
    net = LDNet(1, 6, 3, SMALL)
    opt = torch.optim.Adam(net.parameters())
    base = {"stage": 2, "epoch": 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": {}, "train_config": {"size": 32, "widths": [4, 4]}, "world_size": 1}
    validate_resume_state(base, tmp_path / "c.pt")
    nan = {k: v.clone() for k, v in net.state_dict().items()}
    nan["decoder.emb_head.1.bias"].fill_(float("nan"))
    for change, words in (
        ({"model": nan}, "tensor model.decoder.emb_head.1.bias holds NaN"),
        ({"train_config": {"size": torch.zeros(3)}}, "'train_config' entry 'size' is not a number"),
        ({"world_size": "2"}, "'world_size' must be an int >= 1"),
    ):
        path = tmp_path / "checkpoint.pt"
        ckpt.save_checkpoint(path, {**base, **change})
        with pytest.raises(ValueError) as info:
            load_for_all(path, lambda st: validate_resume_state(st, path))
        assert str(info.value).startswith(f"checkpoint {path}") and words in str(info.value), info.value

    def tripping_check(st):
        return st["train_config"]["size"] > st  # a TypeError inside a check

    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint\.pt cannot be used \(TypeError: "):
        load_for_all(path, tripping_check)


def test_stage3_file_with_nan_weights_is_trained_again_on_resume(tmp_path, caplog):
    """A stage3.pt whose record fits the run but whose weights hold NaN used to be loaded as the
    landmark network without a word; now it is trained again with a warning, as one of another network."""
    import logging

    from ld_ext import train
    from ld_ext.bench import synthetic_images
    from ld_ext.checkpoint import load_checkpoint, save_checkpoint
    from ld_ext.data import ImageFolderDataset
    from ld_ext.tasks.landmarks import pretrain_stage

    def cfg(**kw):
        return train.TrainConfig(out=str(tmp_path / "run"), size=32, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8),
                                 batch_size=2, epochs1=1, epochs2=1, steps_per_epoch=1, val_images=0, progress=False,
                                 seed=3, device="cpu", centre_steps=2, **kw)

    ds = ImageFolderDataset.from_tensor(synthetic_images(6, 32, seed=4))
    train.pretrain(cfg(), dataset=ds)
    path = tmp_path / "run" / pretrain_stage.STAGE3_FILE
    st = load_checkpoint(path)
    st["model"]["decoder.emb_head.1.weight"].fill_(float("nan"))
    save_checkpoint(path, st)
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        res = train.pretrain(cfg(resume=True), dataset=ds)
    assert any("does not fit this network" in r.getMessage() and "holds NaN" in r.getMessage()
               for r in caplog.records), caplog.text
    assert all(torch.isfinite(v).all() for v in res["landmark_model"].state_dict().values() if v.is_floating_point())
