"""A phantom as a CT study: ground-truth quantities, deterministic UIDs and the DICOM series
(see ``docs/phantom.md``, "Ground truth and DICOM").

:func:`write_phantom_series` writes single-frame CT Image Storage instances with plausible
acquisition attributes, so the phantom travels the same DICOM path as a patient's scan, next
to ``labels.nii.gz`` and ``truth.json`` (the :class:`~lungburden.quantify.Quantities` computed
from the phantom's own masks) against which the node's results are checked.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungburden.phantom.anatomy import generate_phantom
from lungburden.phantom.lesions import lps_from_ras
from lungburden.phantom.spec import HU_MIN, Phantom, PhantomSpec
from lungburden.quantify import Quantities, quantify

_UID_ROOT = "lungburden-phantom"


def phantom_quantities(phantom: Phantom) -> Quantities:
    """The :class:`Quantities` of a phantom from its own left-lung mask and its int16 HU.

    The left/right split is the phantom's own (:attr:`Phantom.left_lung`), not quantify.py's
    connected-component rule, so the test that loads the written series and calls
    :func:`quantify` without a mask checks that rule against an independent truth.
    """
    return quantify(phantom.labels, phantom.hu.astype(np.float32), phantom.affine, left_mask=phantom.left_lung)


@dataclass(frozen=True)
class PhantomUIDs:
    """Deterministic UIDs: study and frame of reference from the seed (same synthetic patient,
    same anatomy in mm), series and instances from the whole spec."""

    study: str
    series: str
    frame_of_reference: str
    instances: tuple[str, ...] = field(repr=False)


#: The patient and study attributes a phantom series may be given (follow-up tests, demos).
IDENTITY_KEYWORDS: tuple[str, ...] = ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate",
                                      "StudyDate")


def _identity_key(identity: dict[str, str] | None) -> str:
    return "".join(f";{k}={identity[k]}" for k in sorted(identity)) if identity else ""


def phantom_uids(spec: PhantomSpec, identity: dict[str, str] | None = None) -> PhantomUIDs:
    """UIDs of the phantom series; an ``identity`` (see :func:`write_phantom_series`) enters every
    UID, so the same seed as another patient or on another date is another study."""
    from pydicom.uid import generate_uid

    seed = f"seed={spec.seed}" + _identity_key(identity)
    key = spec.key() + _identity_key(identity)
    return PhantomUIDs(
        study=generate_uid(entropy_srcs=[_UID_ROOT, seed, "study"]),
        series=generate_uid(entropy_srcs=[_UID_ROOT, key, "series"]),
        frame_of_reference=generate_uid(entropy_srcs=[_UID_ROOT, seed, "frame-of-reference"]),
        instances=tuple(generate_uid(entropy_srcs=[_UID_ROOT, key, "instance", str(k)]) for k in range(spec.slices)),
    )


def _ds(value: float) -> str:
    """Decimal String text (<= 16 characters) of a value that parses back to the same float."""
    text = f"{value:.10g}"
    if float(text) != float(value) or len(text) > 16:
        text = f"{value:.8g}"
    return text


def _series_datasets(phantom: Phantom, spec: PhantomSpec, identity: dict[str, str] | None = None) -> list:
    """One CT Image Storage dataset per slice (PS3.3 A.3), in the phantom's slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    import lungburden

    uids = phantom_uids(spec, identity)
    aff = phantom.affine
    ps = float(np.linalg.norm(aff[:3, 1]))
    dz = float(np.linalg.norm(aff[:3, 0]))
    seed = spec.seed
    day = _dt.date(2020, 3, 1) + _dt.timedelta(days=seed % 90)
    date = day.strftime("%Y%m%d")
    time = f"{8 + seed % 10:02d}{(7 * seed) % 60:02d}00"
    sex = "F" if (seed % 2) else "M"
    age = f"{35 + (seed * 13) % 50:03d}Y"
    stored = (phantom.hu.astype(np.int32) - HU_MIN).astype(np.uint16)
    out = []
    for k in range(phantom.hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uids.instances[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"LUNGBURDEN_{lungburden.__version__}"[:16]
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = uids.instances[k]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "lungburden"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest CT phantom"
        ds.SeriesDescription = f"Phantom chest {'C+' if spec.contrast else 'C-'} {dz:g}mm LUNG seed {seed}"[:64]
        ds.ManufacturerModelName = "lungburden phantom"
        # Patient
        ds.PatientName = f"PHANTOM^SEED{seed}"
        ds.PatientID = f"PHANTOM-SEED{seed}"
        ds.PatientBirthDate = ""
        ds.PatientSex = sex
        ds.PatientAge = age
        ds.BodyPartExamined = "CHEST"
        if spec.contrast:
            ds.ContrastBolusAgent = "IOHEXOL 350 MG/ML"
            ds.ContrastBolusRoute = "IV"
        # Acquisition / equipment (plausible values of a helical chest protocol)
        ds.ScanOptions = "HELICAL"
        ds.SliceThickness = _ds(dz)
        ds.KVP = "120"
        ds.SpacingBetweenSlices = _ds(dz)
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = f"lungburden {lungburden.__version__}"
        ds.ProtocolName = "Chest"
        ds.ReconstructionDiameter = _ds(ps * phantom.hu.shape[2])
        ds.DistanceSourceToDetector = "1040"
        ds.DistanceSourceToPatient = "570"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = 200
        ds.Exposure = 100
        ds.FilterType = "BODY"
        ds.GeneratorPower = 24
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = "LUNG"
        ds.PatientPosition = "HFS"
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.TableSpeed = 80.0
        ds.TableFeedPerRotation = 40.0
        ds.SpiralPitchFactor = 1.0
        ds.CTDIvol = 8.0
        phantom_code = Dataset()
        phantom_code.CodeValue = "113691"
        phantom_code.CodingSchemeDesignator = "DCM"
        phantom_code.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom_code]
        # Study / series / image
        ds.StudyInstanceUID = uids.study
        ds.SeriesInstanceUID = uids.series
        ds.StudyID = f"PH{seed}"[:16]
        ds.SeriesNumber = 2 + (1 if spec.contrast else 0)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = aff @ np.array([k, 0.0, 0.0, 1.0])
        ds.ImagePositionPatient = [_ds(float(v)) for v in pos[:3]]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = uids.frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(pos[2]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(phantom.hu.shape[1]), int(phantom.hu.shape[2])
        ds.PixelSpacing = [_ds(ps), _ds(ps)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.BurnedInAnnotation = "NO"
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.RescaleIntercept = str(HU_MIN)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.LossyImageCompression = "00"
        ds.PixelData = stored[k].tobytes()
        for keyword, value in (identity or {}).items():
            setattr(ds, keyword, value)
            if keyword == "StudyDate":
                ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate = value
        out.append(ds)
    return out


def write_phantom_series(phantom: Phantom, out_dir: str | Path, spec: PhantomSpec | None = None,
                         identity: dict[str, str] | None = None) -> Path:
    """Write the phantom into ``out_dir``: ``CT000001.dcm``... (one CT Image Storage instance
    per slice, Explicit VR Little Endian, 12-bit stored values with intercept -1024),
    ``labels.nii.gz`` (label map, RAS affine = LPS affine with x and y negated, array axes as in
    CTVolume) and ``truth.json`` (:class:`Quantities` + UIDs + seed). Returns ``out_dir``.

    ``CT<6 digits>.dcm`` files of an earlier phantom beyond this one's slice count are removed.
    ``identity``: attributes of :data:`IDENTITY_KEYWORDS` replacing the synthetic patient and
    study date (the same patient's studies on several dates, two patients of the same name);
    they enter the UIDs. Without it the series is exactly the seed's.
    """
    unknown = sorted(set(identity or {}) - set(IDENTITY_KEYWORDS))
    if unknown:
        raise ValueError(f"unknown identity attributes {unknown}; known: {', '.join(IDENTITY_KEYWORDS)}")
    import nibabel as nib

    spec = phantom.spec if spec is None else spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = set()
    for k, ds in enumerate(_series_datasets(phantom, spec, identity)):
        name = f"CT{k + 1:06d}.dcm"
        ds.save_as(out / name, enforce_file_format=True)
        names.add(name)
    # Files of an earlier, longer phantom written here would mix two series: remove them.
    for stale in out.glob("CT[0-9][0-9][0-9][0-9][0-9][0-9].dcm"):
        if stale.name not in names:
            stale.unlink()
    ras = lps_from_ras(phantom.affine)
    img = nib.Nifti1Image(phantom.labels, ras)
    img.set_sform(ras, code=1)
    img.set_qform(ras, code=1)
    img.header["descrip"] = b"lungburden phantom labels 0-3"
    nib.save(img, out / "labels.nii.gz")
    uids = phantom_uids(spec, identity)
    truth = phantom_quantities(phantom).to_dict()
    truth.update(study_instance_uid=uids.study, series_instance_uid=uids.series, seed=spec.seed)
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return out


def write_phantom(
    out_dir: str | Path,
    seed: int = 0,
    slices: int = 64,
    spacing: float = 5.0,
    contrast: bool = False,
    burden: float | None = None,
) -> Path:
    """CLI entry: ``lungburden phantom OUT_DIR [--seed N] [--slices K] [--spacing MM]
    [--contrast] [--burden PCT]`` (``spacing`` = slice spacing and thickness in mm)."""
    spec = PhantomSpec(seed=seed, slices=slices, slice_spacing_mm=spacing, contrast=contrast, burden_percent=burden)
    return write_phantom_series(generate_phantom(spec), out_dir, spec)
