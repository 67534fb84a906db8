"""DICOM Segmentation (PS3.3 A.51 Segmentation IOD) of a lungburden label map, built by highdicom.

BINARY segmentation, Explicit VR Little Endian, one frame per source slice and segment (empty
frames kept), pixel-aligned with the source CT so that every frame carries its Derivation Image /
Source Image references (PS3.3 C.7.6.16.2.6). Segments (see :data:`SEGMENTS` and
docs/conformance.md):

1. lung field (labels 1-3),  SCT 39607008 "Lung", category Anatomical Structure;
2. ground-glass opacity (label 2), DCM 112120, category Morphologically Abnormal Structure;
3. high opacity (label 3: consolidation + pleural effusion), SCT 95436008 "Lung consolidation".

The functions here build datasets in memory and do no I/O; write with :func:`write_dataset`.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import Collection
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

import lungburden
from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.results import codes
from lungburden.segmentation.base import AlgorithmInfo

MANUFACTURER = "lungburden"
MANUFACTURER_MODEL_NAME = "lungburden"

SEGMENT_LUNG_FIELD = 1
SEGMENT_GGO = 2
SEGMENT_HIGH_OPACITY = 3


@dataclass(frozen=True)
class SegmentSpec:
    """What one SEG segment holds and how it is described (PS3.3 C.8.20.2 Segment Description)."""

    number: int
    key: str
    label: str
    description: str
    category: Code
    property_type: Code
    label_values: tuple[int, ...]
    #: sRGB of the Recommended Display CIELab Value (PS3.3 C.10.7.1.1), inside the sRGB gamut.
    rgb: tuple[int, int, int]
    anatomic_region: Code | None = None


SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec(
        number=SEGMENT_LUNG_FIELD,
        key="lung_field",
        label="Lung field",
        description="Both lungs including lesions (aerated parenchyma, GGO and high opacity)",
        category=codes.ANATOMICAL_STRUCTURE,
        property_type=codes.LUNG,
        label_values=(L.LUNG, L.GGO, L.HIGH_OPACITY),
        rgb=(65, 140, 220),  # blue
    ),
    SegmentSpec(
        number=SEGMENT_GGO,
        key="ggo",
        label="Ground glass opacity",
        description="Ground-glass opacity: hazy increased attenuation with preserved vessels",
        category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        property_type=codes.GROUND_GLASS_OPACITY,
        label_values=(L.GGO,),
        rgb=(240, 200, 40),  # amber
        anatomic_region=codes.LUNG,
    ),
    SegmentSpec(
        number=SEGMENT_HIGH_OPACITY,
        key="high_opacity",
        label="High opacity",
        description=(
            "High opacity: lung consolidation (SCT 95436008) and pleural effusion (SCT 60046008)"
        ),
        category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        property_type=codes.CONSOLIDATION,
        label_values=(L.HIGH_OPACITY,),
        rgb=(220, 40, 40),  # red
        anatomic_region=codes.LUNG,
    ),
)


def segment_masks(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Boolean mask of every segment (keyed by segment number) from a label map (labels.py)."""
    return {spec.number: np.isin(labels, spec.label_values) for spec in SEGMENTS}


def deterministic_uid(*parts: str) -> str:
    """A ``2.25`` UID from a name-based UUID of ``parts`` (PS3.5 B.2): same inputs, same UID."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(['lungburden', *parts])).int}"


def device_uid(algorithm: AlgorithmInfo) -> str:
    """Device UID of the algorithm (one per name and version), for observer and equipment."""
    return deterministic_uid("device", algorithm.name, algorithm.version)


def tracking_uid(volume: CTVolume, algorithm: AlgorithmInfo, segment_number: int) -> str:
    """Tracking Unique Identifier of a segment: the same finding of the same series and algorithm."""
    spec = {s.number: s for s in SEGMENTS}[segment_number]
    return deterministic_uid("tracking", volume.series_instance_uid, algorithm.name, algorithm.version, spec.key)


def algorithm_family(algorithm: AlgorithmInfo) -> Code:
    """The CID 7162 code whose meaning is ``algorithm.family`` (default Artificial Intelligence)."""
    families = Collection("CID7162")
    wanted = algorithm.family.replace(" ", "").replace("-", "").lower()
    for keyword in families.dir():
        if keyword.lower() == wanted:
            return getattr(families, keyword)
    return codes.ARTIFICIAL_INTELLIGENCE


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Segment Algorithm Identification (PS3.3 C.8.20.2 / Algorithm Identification Macro 10.16)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm_family(algorithm),
        version=algorithm.version,
        source=MANUFACTURER,
        parameters=dict(algorithm.parameters) if algorithm.parameters else None,
    )


def algorithm_equipment(
    algorithm: AlgorithmInfo,
    *,
    manufacturer: str = MANUFACTURER,
    device_serial_number: str | None = None,
) -> hd.ContributingEquipment:
    """Contributing Equipment item for the algorithm (PS3.3 C.12.1.1.5), as IHE AIR asks.

    Manufacturer, model (= algorithm name), software version (= algorithm version) and the
    Device UID (0018,1002) of :func:`device_uid`.
    """
    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=device_serial_number,
        contribution_description=f"Automatic segmentation and quantification by {algorithm.name}",
    )
    item.DeviceUID = device_uid(algorithm)
    return item


def drop_incomplete_references(ds: Dataset) -> None:
    """Remove copied SOP Instance Reference items that lack a UID (PS3.3 Table 10-11).

    Source CT headers are not always conformant (e.g. a Referenced Study Sequence item without
    Referenced SOP Class UID); highdicom copies the General Study and Patient modules verbatim,
    so the incomplete items are dropped from the output here (the sequences are Type 3).
    """
    for keyword in ("ReferencedStudySequence", "ReferencedPatientSequence"):
        if keyword not in ds:
            continue
        kept = [
            item
            for item in ds[keyword].value
            if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")
        ]
        if kept:
            setattr(ds, keyword, kept)
        else:
            delattr(ds, keyword)


def _segment_descriptions(volume: CTVolume, algorithm: AlgorithmInfo) -> list[hd.seg.SegmentDescription]:
    identification = algorithm_identification(algorithm)
    descriptions = []
    for spec in SEGMENTS:
        item = hd.seg.SegmentDescription(
            segment_number=spec.number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=tracking_uid(volume, algorithm, spec.number),
            tracking_id=spec.label,
            anatomic_regions=[spec.anatomic_region] if spec.anatomic_region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        item.SegmentDescription = spec.description
        descriptions.append(item)
    return descriptions


def build_segmentation(
    volume: CTVolume,
    labels: np.ndarray,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 9001,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str = "Lung, GGO and high opacity (lungburden)",
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME,
    software_versions: str | Sequence[str] | None = None,
    device_serial_number: str = "1",
    content_creator_name: str | None = None,
    institution_name: str | None = None,
) -> hd.seg.Segmentation:
    """Encode ``labels`` (same shape and axis order as ``volume.hu``) as a DICOM SEG.

    Patient and study information is copied from the source (highdicom; incomplete copied
    references removed by :func:`drop_incomplete_references`), series and instance are new.
    ``software_versions`` defaults to ``(lungburden version, algorithm version)``.
    """
    if labels.shape != volume.shape:
        raise ValueError(f"label map shape {labels.shape} differs from the volume {volume.shape}")
    if len(volume.datasets) != volume.shape[0]:
        raise ValueError("the volume carries no source header per slice (CTVolume.datasets)")
    masks = segment_masks(labels)
    pixel_array = np.stack([masks[spec.number] for spec in SEGMENTS], axis=-1).astype(np.uint8)
    if software_versions is None:
        software_versions = (lungburden.__version__, algorithm.version)
    with warnings.catch_warnings():
        # Source patient names are copied unchanged even when they are single-component.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=list(volume.datasets),
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(volume, algorithm),
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            # A list, not the tuple highdicom's hint names: pydicom warns on tuples for LO.
            software_versions=software_versions  # type: ignore[arg-type]
            if isinstance(software_versions, str)
            else list(software_versions),
            device_serial_number=device_serial_number,
            content_description=f"Lung, GGO and high opacity: {algorithm.name}"[:64],  # LO: 64 chars
            content_creator_name=content_creator_name,
            content_label="LUNGBURDEN",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=False,
            contributing_equipment=[
                algorithm_equipment(algorithm, manufacturer=manufacturer, device_serial_number=None)
            ],
            series_description=series_description,
            institution_name=institution_name,
        )
    if "ContentCreatorName" not in seg:
        seg.ContentCreatorName = None  # Type 2 in the Content Identification Macro (PS3.3 10.9)
    drop_incomplete_references(seg)
    return seg


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (PS3.10 file meta, enforced) and return the path.

    The file appears atomically (written to a temporary name, fsynced, renamed), so a reader
    never sees a partial result.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path
