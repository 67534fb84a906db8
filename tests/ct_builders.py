"""One builder for the synthetic CT Image Storage datasets of the tests (PS3.3 A.38.1).

Each test module describes only what differs (pixels, geometry, UIDs, a few attributes); the
mandatory modules of a CT image are written here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_slice(
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    index: int,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    spacing: Sequence[float] = (1.0, 1.0),
    thickness: float = 5.0,
    sop_uid: str | None = None,
    **attributes: Any,
) -> Dataset:
    """One axial CT slice of stored values ``pixels`` (int16, rescale 1/0 so values are HU).

    ``attributes`` set or override any other element by keyword (``ConvolutionKernel="L"``,
    ``PatientName=...``). Patient, study and equipment get neutral test values by default.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "Test"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Synthetic", "SYN-1", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "1", ""
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.SeriesNumber, ds.InstanceNumber = 2, index + 1
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds
