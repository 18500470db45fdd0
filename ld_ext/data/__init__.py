"""Image reading for every ld_ext command, and the preprocessed on-disk cache of pre-training.

* ``ld_ext.data.readers``: finding files (``scan_image_files``; ``IMAGE_EXTENSIONS`` is the one
  list of supported extensions) and the one reader (``load_arrays``) of PNG/JPEG/TIFF/BMP, DICOM,
  NIfTI and ``.npy``, used by ``ld-ext pretrain`` and the downstream commands
  (``ld_ext.tasks.common.load_image``).
* ``ld_ext.data.preprocess``: robust scaling to [0, 1], channels, pad/crop and resize
  (``prepare_image``, ``Preprocessing``), and reading many files that way in worker processes.
* ``ld_ext.data.datasets``: ``ImageFolderDataset``, the preprocessed images held in memory
  (small data sets, tests).
* ``ld_ext.data.cache``: ``open_or_build_cache`` / ``CachedImageDataset``, the same
  preprocessing done once into a flat float32 array file plus an index, read by offset during
  training, so nothing of the size of the data set is held in memory; every image has a checksum,
  checked at open and on first read (``CacheIntegrityError``), and a damaged cache is rebuilt.
* ``ld_ext.data.volumes``: 3-D volumes (NIfTI, DICOM series, 3-D ``.npy``): ``read_volume`` (RAS+
  orientation, ``spacing`` resampling, CT window or percentile intensity, label maps) and
  ``list_volume_files`` (one entry per volume; a folder of DICOM slices is one); docs/volumes.md.
* ``ld_ext.data.volume_cache``: ``open_or_build_volume_cache`` / ``VolumePatchDataset``, the volumes
  read once into one float32 file with the image cache's design (checksums, seal, source identity,
  build lock, atomic build), patches read by offset (``read_patch``) so that a step never holds a
  whole volume.
* ``ld_ext.data.cachelock``: the build lock (``CacheLockTimeout`` when a builder shows no
  progress for ``DEFAULT_LOCK_TIMEOUT_S``).

Every public name is importable from ``ld_ext.data`` itself.
"""

from __future__ import annotations

from .cache import (
    CACHE_VERSION,
    DEFAULT_LOCK_TIMEOUT_S,
    CacheIntegrityError,
    CachedImageDataset,
    CacheLockTimeout,
    open_or_build_cache,
)
from .datasets import ImageFolderDataset
from .volume_cache import VOLUME_CACHE_VERSION, VolumePatchDataset, open_or_build_volume_cache
from .volumes import (
    VOLUME_KINDS,
    Volume,
    VolumeScan,
    check_volume_settings,
    list_volume_files,
    normalise_intensity,
    read_volume,
    resample_volume,
    scan_volume_files,
)
from .preprocess import Preprocessing, default_workers, prepare_image, resize_square, scale_intensity, to_channels
from .readers import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    NIFTI_EXTENSIONS,
    NUMPY_EXTENSIONS,
    OUTPUT_MARKER,
    RASTER_EXTENSIONS,
    FileScan,
    MissingReaderError,
    NonFiniteImageError,
    file_stem,
    list_image_files,
    load_arrays,
    mark_output_folder,
    read_dicom,
    read_image,
    read_nifti_slices,
    read_npy,
    scan_image_files,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "RASTER_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "NUMPY_EXTENSIONS",
    "FileScan",
    "scan_image_files",
    "mark_output_folder",
    "OUTPUT_MARKER",
    "list_image_files",
    "file_stem",
    "read_image",
    "read_dicom",
    "read_nifti_slices",
    "read_npy",
    "load_arrays",
    "scale_intensity",
    "to_channels",
    "resize_square",
    "prepare_image",
    "Preprocessing",
    "default_workers",
    "ImageFolderDataset",
    "CachedImageDataset",
    "open_or_build_cache",
    "CACHE_VERSION",
    "CacheIntegrityError",
    "CacheLockTimeout",
    "DEFAULT_LOCK_TIMEOUT_S",
    "MissingReaderError",
    "NonFiniteImageError",
    "Volume",
    "VolumeScan",
    "VOLUME_KINDS",
    "read_volume",
    "list_volume_files",
    "scan_volume_files",
    "check_volume_settings",
    "resample_volume",
    "normalise_intensity",
    "VolumePatchDataset",
    "open_or_build_volume_cache",
    "VOLUME_CACHE_VERSION",
]
