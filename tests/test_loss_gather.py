"""gather_distributed on the loss modules: 2 gloo processes x B equal 1 process x 2B.

A tiny network (one 1x1 conv for the embeddings and assignments, a pooled linear map for the PD
rows) is trained one step in a user's own DDP-style code: each process computes the losses on its
half of the batch with gather_distributed=True, backward, then the gradients are averaged over
processes (what DDP does). Loss values and parameter gradients must equal those of one process on
the whole batch, in float64. With gather_distributed=False the per-process loss differs (the
centres and negatives are local), which shows the comparison can fail.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ld_ext
from ld_ext import distributed as du

B, D, K, H = 3, 5, 4, 6  # per process: B images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"conv": torch.nn.Conv2d(2, D + K, 1), "proj": torch.nn.Linear(2, 7)}).double()


def _batch() -> torch.Tensor:
    return torch.randn(2 * B, 2, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _losses(net, x, gather: bool, two_views: bool = True) -> dict[str, torch.Tensor]:
    zs = net["conv"](x)
    z, s = zs[:, :D], zs[:, D:]
    rd, ent = ld_ext.RegionDiscriminationLoss(
        normalize=True, assignment="sigmoid", return_entropy=True, gather_distributed=gather
    )(z, s)
    rd_plain = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", gather_distributed=gather)(z, s)
    v0 = F.normalize(net["proj"](x.mean(dim=(2, 3))), dim=1)
    v1 = F.normalize(net["proj"](x.flip(-1).square().mean(dim=(2, 3))), dim=1)
    pd_loss = ld_ext.PatchDiscriminationLoss(gather_distributed=gather)
    pd = pd_loss(v0, v1) if two_views else pd_loss(torch.cat([v0, v1]))
    return {"rd": rd, "ent": ent, "rd_plain": rd_plain, "pd": pd, "loss": rd + 0.1 * ent + pd + rd_plain}


def _step(net, x, gather: bool, two_views: bool = True):
    out = _losses(net, x, gather, two_views)
    net.zero_grad()
    out["loss"].backward()
    du.average_gradients(net)  # what DDP does after backward
    return {k: float(v.detach()) for k, v in out.items()}, {n: p.grad.clone() for n, p in net.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    du.init_from_env("cpu")
    x = _batch()[rank * B : (rank + 1) * B]
    net = _net()
    res = {"two_views": _step(net, x, True), "one_tensor": _step(net, x, True, two_views=False)}
    res["local"] = {k: float(v.detach()) for k, v in _losses(net, x, False).items()}
    torch.save(res, f"{out}.{rank}")
    dist.barrier()
    du.cleanup()


def test_two_processes_with_gather_equal_one_process_with_double_batch():
    torch.set_num_threads(1)
    single_losses, single_grads = _step(_net(), _batch(), gather=True)  # no process group: gather is a no-op
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for res in ranks:
        for form in ("two_views", "one_tensor"):
            losses, grads = res[form]
            for k, v in single_losses.items():
                assert losses[k] == pytest.approx(v, rel=1e-10, abs=1e-12), (form, k)
            for n, g in single_grads.items():
                assert g.abs().max() > 0, n
                torch.testing.assert_close(grads[n], g, rtol=1e-8, atol=1e-12, msg=f"{form} {n}")
    # without the gather each process sees only its own centres and negatives: different losses
    for k in ("rd", "rd_plain", "pd"):
        assert abs(ranks[0]["local"][k] - single_losses[k]) > 1e-4, k


def test_two_views_equal_the_concatenated_form():
    x = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
    crit = ld_ext.PatchDiscriminationLoss(temperature=0.3, gather_distributed=True)
    assert crit(x[:4], x[4:]).item() == pytest.approx(ld_ext.patch_discrimination(x, 0.3).item(), rel=1e-14)
    assert crit(x).item() == pytest.approx(ld_ext.patch_discrimination(x, 0.3).item(), rel=1e-14)
    with pytest.raises(ValueError, match="same shape"):
        crit(x[:4], x[:3])
    with pytest.raises(ValueError, match="out1 must have shape"):
        crit(x[:4], x[0])
    with pytest.raises(TypeError, match="gather_distributed"):
        ld_ext.PatchDiscriminationLoss(gather_distributed="yes")
    with pytest.raises(TypeError, match="gather_distributed"):
        ld_ext.RegionDiscriminationLoss(gather_distributed=1)
    assert "gather_distributed=True" in repr(crit)
