"""The in-memory data set: every image of some paths, preprocessed and held as one tensor."""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch

from .preprocess import Preprocessing, file_progress_bar, processed_files, SkipTally
from .readers import scan_image_files

__all__ = ["ImageFolderDataset"]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every 2D image under ``paths``, preprocessed and held in memory as (N, C, size, size) in [0, 1].

    For small data sets and tests; ``ld-ext pretrain`` streams from ``open_or_build_cache``.
    Attributes: ``images`` (the tensor), ``names`` (file[:slice] per image), ``skipped``
    ((path, reason) of files not read), ``nonfinite`` (images skipped for NaN/Inf pixels),
    ``n_upsampled`` (images smaller than ``size``), ``fingerprint`` (hex digest of the pixels).
    ``exclude``: folders and files under ``paths`` never read (``scan_image_files``).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        size: int = 128,
        channels: int = 1,
        *,
        nifti_axes: Sequence[int] = (2,),
        min_foreground: float = 0.05,
        percentiles: tuple[float, float] = (0.5, 99.5),
        fit: str = "pad",
        progress: bool = True,
        max_images: int | None = None,
        workers: int = 0,
        exclude: Sequence[str | os.PathLike] = (),
    ) -> None:
        prep = Preprocessing(size, channels, tuple(nifti_axes), min_foreground, tuple(percentiles), fit)
        scan = scan_image_files(paths, exclude=exclude)
        self.size, self.channels = size, channels
        tally = SkipTally(len(scan.files), scan.not_regular)
        names: list[str] = []
        images: list[torch.Tensor] = []
        with processed_files(scan.files, prep, workers) as results:
            for f, res in zip(file_progress_bar(scan.files, len(scan.files), "loading images", progress), results):
                tally.add(f, res)
                for label, x in res.images:
                    images.append(torch.from_numpy(x))
                    names.append(f"{f}:{label}" if label else str(f))
                if max_images is not None and len(images) >= max_images:
                    images, names = images[:max_images], names[:max_images]
                    break
        tally.warn(size)
        if not images:
            tally.fail(paths)
        self.images = torch.stack(images)
        self.names = names
        self.skipped, self.nonfinite, self.n_upsampled = tally.skipped, tally.nonfinite, tally.n_upsampled
        self._fingerprint: str | None = None

    @classmethod
    def from_tensor(cls, images: torch.Tensor, names: Sequence[str] | None = None) -> "ImageFolderDataset":
        """Wrap an in-memory (N, C, S, S) tensor in [0, 1] (e.g. the demo's MNI slices)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError("images must be a (N, C, S, S) tensor")
        self = cls.__new__(cls)
        self.images = images.float().contiguous()
        self.size, self.channels = images.shape[-1], images.shape[1]
        self.names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        self.skipped, self.nonfinite, self.n_upsampled = [], [], 0
        self._fingerprint = None
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(str(tuple(self.images.shape)).encode())
            h.update(self.images.cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a new (k, C, S, S) tensor."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
