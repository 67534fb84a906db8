"""The builders of the tests' synthetic CT series: one slice (:func:`ct_slice`, PS3.3 A.38.1),
the small uniform series of the node tests and phantom chest CT series.

Each test module describes only what differs (pixels, geometry, UIDs, a few attributes); the
mandatory modules of a CT image are written here once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
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


def make_ct_dataset(
    index: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    rows: int = 32,
    cols: int = 32,
    kernel: str = "L",
    thickness: float = 5.0,
    sop_uid: str | None = None,
) -> Dataset:
    """One slice of a small uniform series (-800 HU) with kernel ``kernel`` (no patient data beyond a fake ID)."""
    return ct_slice(np.full((rows, cols), -800, dtype=np.int16), study_uid=study_uid, series_uid=series_uid,
                    frame_uid=frame_uid, index=index, position=(-100.0, -100.0, -float(index) * thickness),
                    spacing=(200.0 / rows, 200.0 / cols), thickness=thickness, sop_uid=sop_uid,
                    PatientID="NODE-TEST", PatientName="Test^Node", SeriesNumber=2 if kernel == "L" else 3,
                    SeriesDescription=f"Chest {kernel}", ConvolutionKernel=kernel)


def write_ct_series(out_dir: Path, slices: int = 20, study_uid: str | None = None, kernel: str = "L",
                    frame_uid: str | None = None, **kwargs) -> list[Path]:
    """``slices`` slices of :func:`make_ct_dataset` written to ``out_dir`` (``kwargs``: its options)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_uid or generate_uid()
    paths = []
    for i in range(slices):
        ds = make_ct_dataset(i, study_uid, series_uid, frame_uid, kernel=kernel, **kwargs)
        path = out_dir / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom(out_dir: Path, seed: int = 3, slices: int = 24, size: int = 256,
                  slice_spacing_mm: float = 10.0, identity: dict[str, str] | None = None, **spec: Any) -> list[Path]:
    """A phantom chest CT series from :mod:`lungburden.phantom` (realistic input for the pipeline).

    ``spec``: more :class:`~lungburden.phantom.PhantomSpec` fields; ``identity``: patient and study
    date attributes (:func:`~lungburden.phantom.write_phantom_series`). Returns the DICOM files, sorted.
    """
    from lungburden.phantom import PhantomSpec, generate_phantom, write_phantom_series

    phantom_spec = PhantomSpec(seed=seed, slices=slices, rows=size, cols=size, slice_spacing_mm=slice_spacing_mm,
                               **spec)
    write_phantom_series(generate_phantom(phantom_spec), out_dir, phantom_spec, identity)
    return sorted(p for p in Path(out_dir).rglob("*") if p.is_file() and is_dicom(p))


def is_dicom(path: Path) -> bool:
    """True for a PS3.10 file (``DICM`` after the preamble)."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def encode(ds: Dataset) -> bytes:
    """``ds`` as the bytes of a PS3.10 file (what C-STORE and STOW-RS carry)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
