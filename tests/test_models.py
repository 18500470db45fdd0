"""LDNet architecture, stage-1 -> stage-2 loading by name, and checkpoint files."""
from __future__ import annotations

import collections
import os

import pytest
import torch

from ld_ext import checkpoint as ckpt
from ld_ext.models import LDNet

SMALL = (8, 8, 16, 16, 16)


def test_forward_shapes_stage1_and_stage2():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 40, 36)  # not a multiple of 16 on purpose
    z, s = LDNet(1, 8, None, SMALL)(x)
    assert z.shape == (2, 8, 40, 36) and s is None
    z, s = LDNet(1, 8, 5, SMALL)(x)
    assert z.shape == (2, 8, 40, 36) and s.shape == (2, 5, 40, 36)
    z, s = LDNet(3, 4, 2, SMALL)(torch.randn(1, 3, 32, 32))
    assert z.shape == (1, 4, 32, 32) and s.shape == (1, 2, 32, 32)


def test_default_encoder_is_vgg16_bn_tiny():
    net = LDNet()
    feats = net.encoder(torch.randn(1, 1, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 64, 64), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128, 4, 4)]
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 13 and len(bns) == 13  # VGG16's 13 conv layers, each with BN
    assert net.decoder.out_channels == 32
    assert net.config == {"in_channels": 1, "emb_dim": 32, "n_clusters": 16, "widths": [16, 32, 64, 128, 128], "depths": [2, 2, 3, 3, 3]}


def test_stage2_loads_stage1_by_name_not_position():
    torch.manual_seed(0)
    s1 = LDNet(1, 8, None, SMALL)
    for p in s1.parameters():
        p.data.uniform_(-1, 1)
    sd = s1.state_dict()
    shuffled = collections.OrderedDict(reversed(list(sd.items())))
    s2 = LDNet(1, 8, 4, SMALL)
    left = s2.load_stage1(shuffled)
    assert left and all(k.startswith("decoder.cluster_head.") for k in left)
    own = s2.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0)
    s1.eval(), s2.eval()
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(s2(x)[0], s1(x)[0])
    s2b = LDNet.from_stage1(s1, n_clusters=4)
    torch.testing.assert_close(s2b.eval()(x)[0], s1(x)[0])


def test_load_stage1_refuses_mismatch():
    s2 = LDNet(1, 8, 4, SMALL)
    with pytest.raises(ValueError, match="shape mismatch"):
        s2.load_stage1(LDNet(1, 6, None, SMALL).state_dict())
    sd = LDNet(1, 8, None, SMALL).state_dict()
    sd.pop("encoder.groups.0.0.0.weight")
    with pytest.raises(ValueError, match="missing"):
        s2.load_stage1(sd)
    sd = LDNet(1, 8, None, SMALL).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        s2.load_stage1(sd)


@pytest.mark.parametrize("kwargs,exc", [
    ({"in_channels": 0}, ValueError), ({"emb_dim": 1.5}, TypeError), ({"n_clusters": 0}, ValueError),
    ({"widths": (8, 8, 8)}, ValueError),
])
def test_bad_constructor_arguments(kwargs, exc):
    with pytest.raises(exc):
        LDNet(**kwargs)


def test_bad_forward_input():
    net = LDNet(1, 4, 2, SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        net(torch.randn(1, 1, 8, 32))
    with pytest.raises(TypeError):
        net([1, 2])


def test_checkpoint_roundtrip_and_plain_state_dict(tmp_path):
    torch.manual_seed(1)
    net = LDNet(1, 8, 3, SMALL, depths=(1, 2, 1, 1, 1)).eval()
    x = torch.randn(1, 1, 32, 32)
    path = ckpt.save_checkpoint(tmp_path / "sub" / "m.pt", net)
    back = ckpt.load_model(path)
    assert back.config == net.config
    torch.testing.assert_close(back(x)[1], net(x)[1], rtol=0, atol=0)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    back2 = ckpt.load_model(tmp_path / "plain.pt")
    assert back2.config == net.config
    assert not [p for p in os.listdir(tmp_path / "sub") if p.endswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ckpt.load_model(tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        ckpt.load_model(bad)
    # a truncated real checkpoint
    good = ckpt.save_checkpoint(tmp_path / "good.pt", LDNet(1, 4, 2, SMALL))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="trunc.pt"):
        ckpt.load_model(trunc)
    # architecture and weights that do not fit together
    state = ckpt.load_checkpoint(good)
    state["config"]["emb_dim"] = 6
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="mismatch.pt"):
        ckpt.load_model(tmp_path / "mismatch.pt")
    # something that is not a state dict at all
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        ckpt.load_model(tmp_path / "list.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_checkpoint_refuses_code(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Evil()}, p)
    with pytest.raises(ValueError, match="evil.pt"):
        ckpt.load_checkpoint(p)


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, LDNet(1, 4, 2, SMALL))
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, LDNet(1, 4, 2, SMALL))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]
