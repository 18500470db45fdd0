"""2 processes x B (gloo, CPU) must equal 1 process x 2B: same loss, same gradients, same BN stats;
whole runs on 2 torchrun "nodes"; ranks with different data; a frozen rank and --dist-timeout.

Run in float64 so that "equal" can be tested tightly: a wrong gradient scaling, a batch-norm
using local statistics or negatives taken from the local batch only are all off by far more.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ld_ext import distributed as du
from ld_ext.augment import LDViewGenerator, item_generator
from ld_ext.models import LDNet
from ld_ext.bench import synthetic_images
from ld_ext.objective import LDObjective

from helpers_dist import assert_runs_agree, ld_step

SIZE = 32
B = 2  # per process
WIDTHS = (8, 8, 16, 16, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(stage: int) -> LDNet:
    torch.manual_seed(0)
    return LDNet(1, 8, 4 if stage == 2 else None, WIDTHS).double()


def _step(model: LDNet, items: list[int], loss_impl: str):
    """Forward + LD loss + backward on the given global item numbers; returns (losses, grads, bn stats)."""
    pool = synthetic_images(8, SIZE, seed=1).double()
    idx = torch.tensor(items)
    gens = [item_generator(7, i) for i in items]
    vb = LDViewGenerator(SIZE)(pool[idx % 8], pool[(idx + 3) % 8], gens)
    return ld_step(model, vb, LDObjective(loss_impl, grid=4))


def _worker(rank: int, world: int, port: int, out: str, stage: int, loss_impl: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = du.init_from_env("cpu")
    assert info.world_size == world and du.is_distributed()
    model = du.convert_batchnorm(_model(stage), "cpu")
    du.broadcast_module(model)
    items = list(range(rank * B, (rank + 1) * B))
    result = _step(model, items, loss_impl)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    du.cleanup()


@pytest.mark.parametrize("stage,loss_impl", [(2, "fused"), (2, "reference")])
def test_two_processes_equal_one_process_with_double_batch(stage, loss_impl):
    torch.set_num_threads(1)
    single_losses, single_grads, single_bn = _step(_model(stage), list(range(2 * B)), loss_impl)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.pt")
        mp.start_processes(_worker, args=(2, _free_port(), out, stage, loss_impl), nprocs=2, join=True, start_method="spawn")
        dist_losses, dist_grads, dist_bn = torch.load(out, weights_only=True)
    assert set(dist_losses) == set(single_losses)
    if stage == 2:
        assert {"rd", "ent"} <= set(single_losses)
    for k in single_losses:
        assert dist_losses[k] == pytest.approx(single_losses[k], rel=1e-10, abs=1e-12), k
    assert dist_grads.keys() == single_grads.keys()
    worst = 0.0
    for n, g in single_grads.items():
        scale = g.abs().max().item() + 1e-8
        worst = max(worst, (dist_grads[n] - g).abs().max().item() / scale)
    assert worst < 1e-8, f"largest relative gradient difference {worst}"
    # a real difference would be visible: the gradients are not all zero
    assert sum(g.abs().sum().item() for g in single_grads.values()) > 0
    for n, b in single_bn.items():
        torch.testing.assert_close(dist_bn[n], b, rtol=1e-10, atol=1e-12)


def test_all_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert du.all_gather_with_grad(x) is x
    assert not du.is_distributed()


def test_global_batchnorm_matches_batchnorm_single_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    gbn = du.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "cpu")[0]
    assert isinstance(gbn, du.GlobalBatchNorm2d)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(gbn(x), bn(x))
    assert set(gbn.state_dict()) == set(bn.state_dict())


# ----------------------------------------------------------------------------- whole runs in separate processes

WORKER = Path(__file__).with_name("dist_worker.py")


def _png_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(root / f"{i:02d}.png")
    return root


def _env(**extra) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _rank_env(rank: int, world: int, port: int) -> dict:
    return _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world, RANK=rank, LOCAL_RANK=rank)


def _run_checked(cmds_envs, timeout=600):
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c, e in cmds_envs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outs


def test_two_nodes_with_torchrun_equal_one_process(tmp_path):
    """torchrun --nnodes 2 (1 process each, static rendezvous on localhost, gloo) = 1 process x 2B:
    every step's losses through the whole data path (cache, per-rank shards, global negatives),
    float64, to the tolerance of the step test above. lr is tiny: Adam's first update is about
    lr * sign(gradient), which turns rounding-level differences of ~zero gradients into lr-sized ones."""
    one, two, _ = one_process_and_two_nodes(tmp_path, _png_folder(tmp_path / "data"))
    assert one["streaming"] and two["streaming"]


def one_process_and_two_nodes(tmp_path, data, *extra: str):
    """The worker's run on ``data`` in one process (batch 4, ``tmp_path/one``) and with torchrun on two
    nodes of one process each (batch 2 each, ``tmp_path/two``), one cache, lr 1e-12, ``extra`` flags;
    ``assert_runs_agree`` of the two."""
    cache = tmp_path / "cache"
    base = [sys.executable, str(WORKER), str(data)]
    rc, outs = _run_checked([(base + [str(tmp_path / "one"), str(cache), "4", "--lr", "1e-12", *extra], _env())])
    assert rc == [0], outs[0][-3000:]
    port = _free_port()
    cmds = []
    for node in (0, 1):
        cmds.append(([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                      "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER),
                      str(data), str(tmp_path / "two"), str(cache), "2", "--lr", "1e-12", *extra], _env()))
    rc, outs = _run_checked(cmds)
    assert rc == [0, 0], "\n".join(o[-3000:] for o in outs)
    return assert_runs_agree(tmp_path / "one", tmp_path / "two")


def test_ranks_that_see_different_data_stop_with_a_clear_error(tmp_path):
    port = _free_port()
    cmds = []
    for r in (0, 1):
        data = _png_folder(tmp_path / f"data{r}", n=12 + r, seed=r)
        cmds.append(([sys.executable, str(WORKER), str(data), str(tmp_path / "out"), str(tmp_path / f"cache{r}"), "2",
                      "--timeout", "60"], _rank_env(r, 2, port)))
    rc, outs = _run_checked(cmds)
    assert all(r != 0 for r in rc), "\n".join(o[-2000:] for o in outs)
    for o in outs:
        assert "do not see the same data set" in o and "rank 0: 12 images" in o and "rank 1: 13 images" in o, o[-2000:]


def test_a_frozen_rank_makes_the_others_stop_within_the_timeout(tmp_path):
    """Rank 1 SIGSTOPs itself after its first step; rank 0 must fail with a clear error after
    --dist-timeout (5 s here), not wait for gloo's default 30 minutes."""
    data = _png_folder(tmp_path / "data")
    port = _free_port()
    timeout = 5
    procs = []
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    try:
        for r in (0, 1):
            cmd = [sys.executable, str(WORKER), str(data), str(tmp_path / "out"), str(tmp_path / "cache"), "2",
                   "--stop-rank", "1", "--stop-step", "1", "--timeout", str(timeout)]
            procs.append(subprocess.Popen(cmd, env=_rank_env(r, 2, port), stdout=open(logs[r], "w"), stderr=subprocess.STDOUT))
        deadline = time.time() + 300
        while "stopping myself" not in logs[1].read_text():
            assert time.time() < deadline and procs[1].poll() is None, logs[1].read_text()[-2000:]
            time.sleep(0.2)
        t_stop = time.time()
        rc0 = procs[0].wait(timeout=timeout + 60)
        waited = time.time() - t_stop
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    out0 = logs[0].read_text()
    assert rc0 != 0
    assert "timed out" in out0.lower() and "--dist-timeout 5 s" in out0 and "frozen" in out0, out0[-3000:]
    assert waited < timeout + 60  # (gloo's default would be 1800 s)


def test_helpers_without_a_process_group_and_bad_timeouts():
    assert not du.is_distributed()
    du.check_same_dataset(3, "ab" * 32)  # nothing to compare with: no error
    obj = {"a": torch.ones(2)}
    assert du.broadcast_object(obj) is obj
    for bad in (0, -1.0, "600", True):
        with pytest.raises(ValueError, match="timeout"):
            du.init_from_env("cpu", timeout=bad)
    from ld_ext.train import TrainConfig

    with pytest.raises(ValueError, match="dist_timeout"):
        TrainConfig(dist_timeout=0).validate()
    msg = str(du.collective_error(RuntimeError("Timed out waiting 5000ms for recv"), 5.0))
    assert "--dist-timeout 5 s" in msg and "Timed out waiting" in msg
