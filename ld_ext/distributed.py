"""Multi-process training helpers on torch.distributed (gloo on CPU, nccl on GPU).

The LD losses are computed over the GLOBAL batch: every process all-gathers the (N, K, D)
region features, the PD rows and the mixup rows (``all_gather_with_grad``) and evaluates the
same global loss. The gather's backward sums the incoming gradients over processes and keeps
the local slice, which makes the whole job one autograd graph whose objective is
``world_size x loss``; ``average_gradients`` then divides by the world size, so the update equals
the single-process update on the concatenated batch. Batch-norm statistics are made global with
``GlobalBatchNorm2d`` / ``GlobalBatchNorm3d`` (CPU; torch's SyncBatchNorm only supports accelerators) or torch's
``SyncBatchNorm`` on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_from_env",
    "DEFAULT_TIMEOUT_S",
    "check_same_dataset",
    "broadcast_object",
    "CollectiveError",
    "collective_error",
    "is_distributed",
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_reduce_mean",
    "average_gradients",
    "broadcast_module",
    "GlobalBatchNorm2d",
    "GlobalBatchNorm3d",
    "convert_batchnorm",
    "barrier",
    "cleanup",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


DEFAULT_TIMEOUT_S = 600.0


def init_from_env(device: str | None = None, timeout: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, ...).

    Without those variables (or WORLD_SIZE=1) nothing is initialised. Backend: nccl when the
    device is CUDA, gloo otherwise. ``timeout`` (seconds, default ``DEFAULT_TIMEOUT_S``) bounds
    the start-up rendezvous and every collective: a process that waits longer for another (frozen,
    dead) one fails with an error instead of hanging (gloo's own default is 30 minutes).
    """
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
    if device not in (None, "auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if device is not None and str(device).startswith("cuda:"):
        want_cuda = True
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    if ws <= 1:
        dev = torch.device(device if device not in (None, "auto") else ("cuda" if want_cuda else "cpu"))
        return DistInfo(0, 1, 0, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_same_dataset(n_images: int, fingerprint: str) -> None:
    """Stop with a ``ValueError`` on every process unless all see the same data set.

    Compares the image count and the first 60 bits of the hex ``fingerprint`` (for a cache: its
    key, a hash of the settings and of every file's path, size and mtime). No-op when not distributed.
    """
    if not is_distributed():
        return
    fp = int(str(fingerprint)[:15], 16)
    mine = torch.tensor([int(n_images), fp], dtype=torch.int64, device=_collective_device())
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    seen = [(int(p[0]), int(p[1])) for p in parts]
    if len(set(seen)) > 1:
        detail = "; ".join(f"rank {r}: {n} images, fingerprint {f:015x}" for r, (n, f) in enumerate(seen))
        raise ValueError(
            "the processes do not see the same data set (" + detail + "). Give every node the same --data "
            "(same files, sizes and modification times) and the same preprocessing options"
        )


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` on every process (pickled; e.g. a checkpoint read once)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_collective_device() if dist.get_backend() == "nccl" else None)
    return box[0]


class CollectiveError(RuntimeError):
    """A collective operation with the other processes failed or timed out (``collective_error``)."""


def collective_error(exc: BaseException, timeout: float | None) -> CollectiveError:
    """A clear error for a failed or timed-out collective (the cause is kept as ``__cause__``)."""
    t = f"{timeout:g} s" if timeout is not None else "the timeout"
    return CollectiveError(
        f"rank {rank()}: a collective operation with the other processes failed or timed out (--dist-timeout {t}): "
        f"another process is probably frozen, killed or failed; see its output. ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''})"
    )


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ws = dist.get_world_size()
        ctx.dim, ctx.rank, ctx.n = dim, dist.get_rank(), x.shape[dim]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None


def all_gather_with_grad(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``x`` from all processes along ``dim`` (rank order), with gradients.

    Every process must pass the same shape. Without a process group this returns ``x``.
    """
    if not is_distributed():
        return x
    return _AllGather.apply(x, dim)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor (no gradient); ``x`` itself when not distributed."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def average_gradients(module: nn.Module) -> None:
    """Average .grad over processes (one coalesced all-reduce per dtype)."""
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    ws = dist.get_world_size()
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ws
        off = 0
        for g in gs:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of process ``src`` to all processes."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


class _GlobalBatchNorm:
    """The cross-process statistics shared by ``GlobalBatchNorm2d`` and ``GlobalBatchNorm3d``."""

    _spatial = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        if x.dim() != 2 + self._spatial:
            raise ValueError(f"expected a {2 + self._spatial}D input, got {x.dim()}D")
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = (0, *range(2, xf.dim()))
        shape = (1, -1) + (1,) * self._spatial
        n = xf.numel() // xf.shape[1]
        mean_l = xf.mean(dim=dims)
        m2_l = ((xf - mean_l.view(shape)) ** 2).sum(dim=dims)
        cnt = torch.full_like(mean_l, float(n))
        stats = all_gather_with_grad(torch.stack([cnt, mean_l, m2_l])[None], dim=0)  # (W, 3, C)
        counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = m2 / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - mom).add_(mean.detach().to(self.running_mean.dtype), alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased.detach().to(self.running_var.dtype), alpha=mom)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every process (works on CPU).

    Each process contributes (count, sum, centred sum of squares) per channel; they are
    all-gathered with gradients and combined with the parallel-variance formula. Identical to
    ``nn.BatchNorm2d`` when not distributed. Parameter and buffer names are those of
    ``nn.BatchNorm2d``, so state dicts are interchangeable.
    """

    _spatial = 2


class GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    """``GlobalBatchNorm2d`` for volumes (N, C, X, Y, Z): the 3-D network's batch norm on CPU."""

    _spatial = 3


def convert_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every BatchNorm2d/3d by a cross-process version (SyncBatchNorm on CUDA, else
    GlobalBatchNorm2d/3d)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    kinds = ((nn.BatchNorm2d, GlobalBatchNorm2d), (nn.BatchNorm3d, GlobalBatchNorm3d))
    cls = next((g for b, g in kinds if isinstance(module, b) and not isinstance(module, _GlobalBatchNorm)), None)
    if cls is not None:
        ref = module.weight if module.affine else module.running_mean
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **kw)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module._modules[name] = _convert_cpu(child)
    return module
