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
    assert net.config == {"in_channels": 1, "emb_dim": 32, "n_clusters": 16, "widths": [16, 32, 64, 128, 128], "depths": [2, 2, 3, 3, 3], "spatial_dims": 2}


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


# ---------------------------------------------------------------------------------------------- 3-D


def test_forward_shapes_3d():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 20, 16, 18)  # not multiples of 16 on purpose
    z, s = LDNet(1, 8, None, SMALL, spatial_dims=3)(x)
    assert z.shape == (2, 8, 20, 16, 18) and s is None
    net = LDNet(1, 8, 5, SMALL, spatial_dims=3)
    z, s = net(x)
    assert z.shape == (2, 8, 20, 16, 18) and s.shape == (2, 5, 20, 16, 18)
    assert net.config["spatial_dims"] == 3
    assert LDNet(**net.config).config == net.config
    assert [type(m) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))] == []
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    bns = [m for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(convs) == 13 and len(bns) == 13
    feats = net.encoder(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32, 32), (8, 16, 16, 16), (16, 8, 8, 8), (16, 4, 4, 4), (16, 2, 2, 2)]
    # same widths and heads as 2-D: the same names, each weight one (3) more kernel dim
    two = LDNet(1, 8, 5, SMALL).state_dict()
    three = net.state_dict()
    assert list(two) == list(three)
    for k, v in two.items():
        assert three[k].shape == (v.shape + (3,) if v.dim() == 4 else v.shape), k


def test_3d_forward_refuses_wrong_input():
    net = LDNet(1, 4, 2, SMALL, spatial_dims=3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, X, Y, Z\)"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 16x16x16 voxels"):
        net(torch.randn(1, 1, 16, 8, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        LDNet(1, 4, 2, SMALL)(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("value,exc", [(1, ValueError), (4, ValueError), (3.0, TypeError), (True, TypeError)])
def test_bad_spatial_dims(value, exc):
    with pytest.raises(exc, match="spatial_dims"):
        LDNet(spatial_dims=value)


def test_3d_stage2_from_stage1_by_name():
    torch.manual_seed(0)
    s1 = LDNet(1, 8, None, SMALL, spatial_dims=3).eval()
    s2 = LDNet.from_stage1(s1, n_clusters=4).eval()
    assert s2.config["spatial_dims"] == 3
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(s2(x)[0], s1(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        LDNet(1, 8, 4, SMALL).load_stage1(s1.state_dict())  # a 3-D stage 1 into a 2-D stage 2


def test_3d_checkpoint_roundtrip_and_plain_state_dict(tmp_path):
    torch.manual_seed(1)
    net = LDNet(1, 8, 3, SMALL, depths=(1, 2, 1, 1, 1), spatial_dims=3).eval()
    x = torch.randn(1, 1, 16, 20, 16)
    back = ckpt.load_model(ckpt.save_checkpoint(tmp_path / "m3.pt", net))
    assert back.config == net.config and back.spatial_dims == 3
    torch.testing.assert_close(back(x)[1], net(x)[1], rtol=0, atol=0)
    torch.save(net.state_dict(), tmp_path / "plain3.pt")  # no config: inferred from the 5-dim conv weights
    back2 = ckpt.load_model(tmp_path / "plain3.pt")
    assert back2.config == net.config
    torch.testing.assert_close(back2(x)[0], net(x)[0], rtol=0, atol=0)


def test_old_checkpoint_without_spatial_dims_is_2d(tmp_path):
    net = LDNet(1, 4, 2, SMALL).eval()
    cfg = dict(net.config)
    del cfg["spatial_dims"]  # as written before 3-D networks existed
    path = ckpt.save_checkpoint(tmp_path / "old.pt", {"config": cfg, "model": net.state_dict()})
    back = ckpt.load_model(path)
    assert back.config["spatial_dims"] == 2
    # the same config (no spatial_dims: 2-D) over 3-D weights: one error naming the file and the field
    net3 = LDNet(1, 4, 2, SMALL, spatial_dims=3)
    bad = ckpt.save_checkpoint(tmp_path / "old3.pt", {"config": cfg, "model": net3.state_dict()})
    with pytest.raises(ValueError, match=r"old3\.pt.*spatial_dims=2 \(the tensors say 3\)"):
        ckpt.load_model(bad)


@pytest.mark.parametrize("value,msg", [(4, "spatial_dims must be in \\[2, 3\\], got 4"), ("3", "spatial_dims must be an int")])
def test_checkpoint_refuses_bad_spatial_dims(tmp_path, value, msg):
    net = LDNet(1, 4, 2, SMALL, spatial_dims=3)
    cfg = dict(net.config, spatial_dims=value)
    path = ckpt.save_checkpoint(tmp_path / "bad.pt", {"config": cfg, "model": net.state_dict()})
    with pytest.raises(ValueError, match=msg):
        ckpt.load_model(path)


def test_3d_checkpoint_bounds_compare_against_3d_meta_network(tmp_path):
    """A stored 3-D config over weights with one tensor of a 2-D shape is refused by the meta-device
    comparison (names the tensor), not by load_state_dict after the network was built."""
    net = LDNet(1, 4, 2, SMALL, spatial_dims=3)
    sd = net.state_dict()
    sd["decoder.emb_head.1.weight"] = torch.zeros(4, 4, 3, 3)
    path = ckpt.save_checkpoint(tmp_path / "flat.pt", {"config": net.config, "model": sd})
    with pytest.raises(ValueError, match=r"flat\.pt does not match the LDNet it describes.*decoder\.emb_head\.1\.weight"):
        ckpt.load_model(path)
