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


def _expanded_state(cfg: dict) -> dict:
    """A state dict of the shapes ``LDNet(**cfg)`` declares, each tensor a stride-0 view of one
    number (a file of a few KB that declares gigabytes)."""
    with torch.device("meta"):
        big = LDNet(**cfg)
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if v.dim() else torch.zeros((), dtype=v.dtype)
            for k, v in big.state_dict().items()}


@pytest.mark.parametrize("with_config", [True, False])
def test_expanded_tensors_declaring_gigabytes_are_refused_before_any_allocation(tmp_path, with_config):
    cfg = {"in_channels": 1, "emb_dim": 8, "n_clusters": 4, "widths": [8192] * 5}
    sd = _expanded_state(cfg)
    assert sum(v.numel() * v.element_size() for v in sd.values()) > 40 * 2**30  # 47 GiB declared
    path = tmp_path / "bomb.pt"
    ckpt.save_checkpoint(path, {"config": cfg, "model": sd} if with_config else sd)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"bomb\.pt: tensor model\..* declares .* bytes but its storage holds 4"):
        ckpt.load_model(path)
    with pytest.raises(ValueError, match="stride-0"):
        ckpt.load_checkpoint(path)


def test_expanded_tensor_anywhere_in_the_file_is_refused(tmp_path, good):
    # e.g. in the optimiser state of a training checkpoint, or in the landmark network
    net = LDNet(**good["config"])
    for extra in ({"optimizer": {"state": {0: {"exp_avg": torch.zeros(1).expand(10_000_000)}}}},
                  {ckpt.LANDMARK_KEY: {**net.state_dict(), "x": torch.zeros(2)[None].expand(10**6, 2)}}):
        path = tmp_path / "x.pt"
        ckpt.save_checkpoint(path, {**good, **extra})
        with pytest.raises(ValueError, match="declares"):
            ckpt.load_checkpoint(path)


def test_views_that_hold_their_elements_still_load(tmp_path, good):
    # channels_last weights are not contiguous but hold every element: nothing real is refused
    net = LDNet(**good["config"]).to(memory_format=torch.channels_last)
    path = tmp_path / "cl.pt"
    ckpt.save_checkpoint(path, net)
    back = ckpt.load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


def test_loading_a_small_bomb_stays_small_in_a_child_process(tmp_path):
    """The must-hold of the hardening issue: no allocation above 1.5 GB for a checkpoint under 1 MB."""
    import sys
    import textwrap

    from ld_ext.bench.memory import child_peak_rss

    cfg = {"in_channels": 1, "emb_dim": 32, "n_clusters": 16, "widths": [8192] * 5}
    path = tmp_path / "bomb.pt"
    ckpt.save_checkpoint(path, {"config": cfg, "model": _expanded_state(cfg)})
    code = textwrap.dedent(f"""
        import sys
        from ld_ext.checkpoint import load_model
        try:
            load_model({str(path)!r})
        except ValueError as e:
            print(e, file=sys.stderr)
            sys.exit(3)
    """)
    rc, peak, err = child_peak_rss([sys.executable, "-c", code])
    assert rc == 3 and "declares" in err, err
    assert peak < 1.5e9, peak
