"""Which images each step of each process trains on, and how they reach the device.

Every step's items are derived from (seed, stage, epoch, step): ``epoch_order`` permutes the data
set per epoch, ``batch_indices`` gives a step's global items and their partner images, so that
``--resume`` continues exactly and 2 processes x B equal 1 process x 2B. ``Batches`` yields one
process's share of each step from memory (an ``ImageFolderDataset`` moved to the device once) or
streamed from the cache by a DataLoader.

Volumes (``--dims 3``): a step's items are volumes, chosen the same way; each item and each
partner gets a random cubic patch, its corner drawn from (seed, stage, epoch, step, item number),
and only the patches are read from the volume cache (``read_patch``).
"""

from __future__ import annotations

import os
import time

import torch

from .augment import item_generator
from .data import ImageFolderDataset

__all__ = ["epoch_order", "batch_indices", "patch_corner", "default_loader_workers", "Batches"]


def epoch_order(n: int, stage: int, epoch: int, seed: int) -> torch.Tensor:
    """The item order of one epoch (a permutation of the n images)."""
    return torch.randperm(n, generator=item_generator(seed, stage, epoch, -1))


def batch_indices(
    n: int, stage: int, epoch: int, step: int, global_batch: int, seed: int, order: torch.Tensor | None = None
):
    """Global item indices, their partner images and the items' global numbers for one step.

    ``order`` is ``epoch_order(n, stage, epoch, seed)`` when the caller already has it.
    """
    if order is None:
        order = epoch_order(n, stage, epoch, seed)
    pos = (step * global_batch + torch.arange(global_batch)) % n
    idx = order[pos]
    if n > 1:
        g = item_generator(seed, stage, epoch, -2, step)
        partner = (idx + 1 + torch.randint(0, n - 1, (global_batch,), generator=g)) % n
    else:
        partner = idx.clone()
    return idx, partner, step * global_batch + torch.arange(global_batch)


class _StepImages(torch.utils.data.Dataset):
    """Item ``(stage, epoch, step)``: this process's share of one step, the B item images followed by
    their B partner images, (2B, C, S, S), read from the data set (for a cache: just those images).

    Everything is derived from the key, so DataLoader workers need no shared state and the batches
    are those of ``batch_indices`` whatever the worker count.
    """

    def __init__(self, dataset, n: int, global_batch: int, batch: int, rank: int, seed: int) -> None:
        self.dataset, self.n, self.gb, self.b, self.rank, self.seed = dataset, n, global_batch, batch, rank, seed
        self._order_key: tuple | None = None
        self._order: torch.Tensor | None = None

    def indices(self, stage: int, epoch: int, step: int) -> torch.Tensor:
        if self._order_key != (stage, epoch):
            self._order, self._order_key = epoch_order(self.n, stage, epoch, self.seed), (stage, epoch)
        idx, partner, _ = batch_indices(self.n, stage, epoch, step, self.gb, self.seed, self._order)
        sl = slice(self.rank * self.b, (self.rank + 1) * self.b)
        return torch.cat([idx[sl], partner[sl]])

    def __getitem__(self, key) -> torch.Tensor:
        return self.dataset.read(self.indices(*key))

    def __len__(self) -> int:  # not used for sampling (the sampler gives the keys)
        return 0


def patch_corner(shape, edge: int, generator: torch.Generator) -> tuple[int, ...]:
    """A random corner of a cubic patch of ``edge`` voxels in a volume of ``shape`` (X, Y, Z): uniform
    over the corners that keep the patch inside; along an axis shorter than ``edge``, uniform over
    the placements that hold the whole axis (the rest of the patch is zeros)."""
    out = []
    for n in shape:
        lo, hi = min(0, n - edge), max(0, n - edge)
        out.append(lo + int(torch.randint(0, hi - lo + 1, (), generator=generator)))
    return tuple(out)


class _StepPatches(_StepImages):
    """Item ``(stage, epoch, step)`` of a volume data set: the B item patches then the B partner
    patches, (2B, 1, E, E, E) with E = ``edge``, each read alone from the volume cache."""

    def __init__(self, dataset, n: int, global_batch: int, batch: int, rank: int, seed: int, edge: int) -> None:
        super().__init__(dataset, n, global_batch, batch, rank, seed)
        self.edge = edge

    def __getitem__(self, key) -> torch.Tensor:
        stage, epoch, step = key
        vols = self.indices(stage, epoch, step).tolist()
        item_no = (step * self.gb + torch.arange(self.rank * self.b, (self.rank + 1) * self.b)).tolist()
        patches = []
        for j, v in enumerate(vols):  # items, then their partners
            g = item_generator(self.seed, stage, epoch, -7, step, item_no[j % self.b], j // self.b)
            corner = patch_corner(self.dataset.shapes[v], self.edge, g)
            patches.append(self.dataset.read_patch(v, corner, (self.edge,) * 3))
        return torch.stack(patches)


class _StepKeys(torch.utils.data.Sampler):
    """The keys of the steps still to run in the current epoch (set before each pass)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []

    def set(self, stage: int, epoch: int, start: int, steps: int) -> None:
        self.keys = [(stage, epoch, s) for s in range(start, steps)]

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def default_loader_workers(device: torch.device) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    # CPU: reading a step's images from the cache takes well under 1 % of the step (benchmarks/
    # data_pipeline.py), so the main process reads them itself; a worker would only compete for
    # the cores the training uses
    return min(4, max(1, cpus // 2)) if device.type == "cuda" else 0


class Batches:
    """The per-step source images of one process, from memory or streamed from the cache.

    An in-memory data set (``ImageFolderDataset``) is moved to the device once and indexed there.
    A ``CachedImageDataset`` is read by a DataLoader (``workers`` processes, pinned memory on CUDA,
    prefetching) one step at a time; nothing of the size of the data set is held.
    ``wait_s`` accumulates the time the training loop spent waiting for the next batch.
    With ``patch`` (an edge in voxels) the data set is a volume cache and each step's patches are
    read from it (streamed).
    """

    def __init__(
        self,
        dataset,
        n: int,
        gb: int,
        b: int,
        rank: int,
        seed: int,
        device: torch.device,
        workers: int,
        patch: int | None = None,
    ) -> None:
        self.device, self.b = device, b
        if patch is None:
            self.source = _StepImages(dataset, n, gb, b, rank, seed)
        else:
            self.source = _StepPatches(dataset, n, gb, b, rank, seed, patch)
        self.streaming = patch is not None or not isinstance(dataset, ImageFolderDataset)
        self.wait_s = 0.0
        if not self.streaming:
            self.images_dev = dataset.images.to(device)
            return
        self.keys = _StepKeys()
        pin = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            self.source,
            batch_size=None,
            sampler=self.keys,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),  # never draws from the global RNG
        )

    def epoch(self, stage: int, epoch: int, start: int, steps: int):
        """Yield (step, img1, img2) on the device for steps ``start .. steps - 1``."""
        if not self.streaming:
            for step in range(start, steps):
                t = time.perf_counter()
                ix = self.source.indices(stage, epoch, step).to(self.device)
                both = self.images_dev[ix]
                self.wait_s += time.perf_counter() - t
                yield step, both[: self.b], both[self.b :]
            return
        self.keys.set(stage, epoch, start, steps)
        it = iter(self.loader)
        for step in range(start, steps):
            t = time.perf_counter()
            both = next(it).to(self.device, non_blocking=True)
            self.wait_s += time.perf_counter() - t
            yield step, both[: self.b], both[self.b :]
