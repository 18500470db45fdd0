"""Checkpoint files: a malformed config is refused before anything is built, every error names
the file, and torch's loader messages are replaced by ours."""
from __future__ import annotations

import copy

import pytest
import torch

from ld_ext import checkpoint as ckpt
from ld_ext.models import LDNet

SMALL = [4, 4, 8, 8, 8]


@pytest.fixture(scope="module")
def good():
    torch.manual_seed(0)
    net = LDNet(1, 6, 3, SMALL)
    return {"format": ckpt.FORMAT, "version": 1, "config": net.config, "model": net.state_dict()}


def _config(**kw):
    def f(c):
        c["config"].update(kw)
    return f


CASES = {
    "huge widths": (_config(widths=[40000] * 5), "widths[0] must be in [1, 8192], got 40000"),
    "huge depths": (_config(depths=[100000] * 5), "depths[0] must be in [1, 64], got 100000"),
    "widths disagree with tensors": (_config(widths=[4, 4, 8, 8, 16]), "config does not match its weights"),
    "depths disagree with tensors": (_config(depths=[2, 2, 3, 3, 4]), "config does not match its weights"),
    "widths str": (_config(widths="abc"), "widths must be a list of 5 ints"),
    "widths 4 entries": (_config(widths=[4, 4, 8, 8]), "widths must be a list of 5 ints"),
    "width float": (_config(widths=[4.0, 4, 8, 8, 8]), "widths[0] must be an int"),
    "width bool": (_config(widths=[True, 4, 8, 8, 8]), "widths[0] must be an int"),
    "width zero": (_config(widths=[0, 4, 8, 8, 8]), "widths[0] must be in"),
    "emb_dim str": (_config(emb_dim="6"), "emb_dim must be an int"),
    "n_clusters negative": (_config(n_clusters=-1), "n_clusters must be in"),
    "in_channels huge": (_config(in_channels=10**9), "in_channels must be in"),
    "unknown entry": (_config(activation="gelu"), "unknown entries"),
    "config list": (lambda c: c.__setitem__("config", [1, 2]), "'config' must be a dict"),
    "model not tensors": (lambda c: c["model"].__setitem__("x", "y"), "must map parameter names to tensors"),
    "model missing a key": (lambda c: c["model"].pop("decoder.emb_head.1.weight"), "does not describe an LDNet"),
    "tensor of wrong shape": (lambda c: c["model"].__setitem__("decoder.emb_head.1.bias", torch.zeros(99)), "does not match the LDNet"),
    "format": (lambda c: c.__setitem__("format", "other"), "has format 'other'"),
    "model str": (lambda c: c.__setitem__("model", "abc"), "'model' entry is not a state dict"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_weights_file_is_refused_naming_it(tmp_path, good, case):
    mutate, words = CASES[case]
    obj = copy.deepcopy(good)
    mutate(obj)
    path = tmp_path / "weights.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError) as info:
        ckpt.load_model(path)
    msg = str(info.value)
    assert str(path) in msg and words in msg, msg


def test_good_file_still_loads(tmp_path, good):
    path = tmp_path / "w.pt"
    torch.save(good, path)
    m = ckpt.load_model(path)
    assert m.config == good["config"]
    plain = tmp_path / "plain.pt"
    torch.save(good["model"], plain)  # a plain state dict: architecture from the shapes
    assert ckpt.load_model(plain).config == good["config"]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "the file is empty"),
        (b"garbage", "not a PyTorch checkpoint"),
    ],
)
def test_unreadable_files_in_our_words(tmp_path, content, words):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        ckpt.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"could not read checkpoint {path}: {words}") and "weights_only" not in msg, msg


def test_truncated_and_foreign_object_files(tmp_path, good):
    import argparse

    full = tmp_path / "full.pt"
    torch.save(good, full)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"trunc\.pt: the file is a truncated or damaged PyTorch archive"):
        ckpt.load_checkpoint(trunc)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt: it holds a Python object of type argparse\.Namespace"):
        ckpt.load_checkpoint(evil)


def test_remove_stale_temp_files_touches_only_our_pattern(tmp_path):
    ours = [tmp_path / ".model.pt.a1b2c3d4.tmp", tmp_path / ".x.json.____zzzz.tmp"]
    other = [tmp_path / "model.pt", tmp_path / ".model.pt.tmp", tmp_path / ".model.pt.a1b2c3d.tmp", tmp_path / "a.tmp"]
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    for p in ours + other:
        p.write_bytes(b"x")
    removed = ckpt.remove_stale_temp_files(tmp_path, ["model.pt"])
    assert removed == [ours[0]] and ours[1].exists()
    assert sorted(ckpt.remove_stale_temp_files(tmp_path)) == [ours[1]]
    assert all(p.exists() for p in other) and (tmp_path / ".dir.abcdefgh.tmp").is_dir()
