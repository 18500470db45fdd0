"""A DICOM file written for a test (needs pydicom): shared by the 2-D reader tests (test_data.py)
and the DICOM series tests (test_volumes.py)."""
from __future__ import annotations

import numpy as np


def write_dicom(path, pixels, *, sop_class="SecondaryCaptureImageStorage", photometric="MONOCHROME2", slope=None,
                intercept=None, **elements):
    """``pixels`` (rows, columns) as a one-frame, 16-bit unsigned DICOM file at ``path``, of the SOP
    class named (a name in ``pydicom.uid``), with RescaleSlope/Intercept when ``slope`` is given and
    any further ``elements`` (keyword=value, e.g. Modality="CT")."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = getattr(uid, sop_class)
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(str(path), enforce_file_format=True)
