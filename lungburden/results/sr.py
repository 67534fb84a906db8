"""TID 1500 Measurement Report (PS3.16) in a Comprehensive 3D SR (PS3.3 A.35.13), built by highdicom.

Content tree (see docs/conformance.md for the codes and the reasons behind them)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context: device observer = the algorithm (TID 1002/1004)
      Procedure Reported: SCT 169069000 "CT of chest"
      Imaging Measurements
        Measurement Group (TID 1411) "Lung field"   -> SEG segment 1
            finding Lung, site Lung; Volume; Volume (site Lung, laterality Left); ... Right
        Measurement Group (TID 1411) "Ground glass opacity" -> SEG segment 2
            finding GGO, site Lung; Volume; Volume Ratio [%] of the lung field; Mean attenuation
        Measurement Group (TID 1411) "High opacity" -> SEG segment 3
            finding Lung consolidation, site Lung; Volume; Volume Ratio [%]; Mean attenuation
        Measurement Group (TID 1501) "Pneumonia burden"
            finding Abnormal opacity (GGO + high opacity), site Lung; Volume; Volume Ratio [%]
        Measurement Group (TID 1410) per finding above, same Tracking Identifier and UID:
            Image Region SCOORD POINT on the finding's key slice (SELECTED FROM the CT image)

The TID 1410 groups locate each finding in image coordinates: a point on the finding in the
source slice where its in-plane area is largest (a point on the lung field where the finding is
empty). They share the Tracking Unique Identifier (TID 4108) of the group whose numbers they
locate, so viewers that merge groups by tracking UID show the numbers at that point; they carry
no numbers of their own.

Volumes are in UCUM ``cm3`` (= mL), ratios in ``%`` of the lung field volume, mean attenuation in
``[hnsf'U]`` (concept Attenuation Coefficient with derivation Mean). A mean that is ``None``
(empty class) is left out. The mean HU of the aerated parenchyma (label 1 only,
``Quantities.lung_mean_hu``) has no segment of its own and is not encoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code

import lungburden
from lungburden.dicom_io.volume import CTVolume
from lungburden.followup.trend import FollowUp
from lungburden.quantify import Quantities
from lungburden.results import codes
from lungburden.results.seg import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    SEGMENT_GGO,
    SEGMENT_HIGH_OPACITY,
    SEGMENT_LUNG_FIELD,
    algorithm_equipment,
    algorithm_family,
    deterministic_uid,
    device_uid,
    drop_incomplete_references,
    segment_masks,
)
from lungburden.results.sr_followup import coding_scheme_identification, followup_groups
from lungburden.results.sr_zones import zone_group
from lungburden.segmentation.base import AlgorithmInfo

#: Tracking identifier (TID 4108) of the burden group, which has no segment of its own.
BURDEN_TRACKING_ID = "Pneumonia burden"


def _tracking(segmentation: hd.seg.Segmentation, segment_number: int) -> hd.sr.TrackingIdentifier:
    """The segment's own Tracking ID / UID from the SEG, so SR and SEG track the same finding."""
    item = segmentation.SegmentSequence[segment_number - 1]
    if int(item.SegmentNumber) != segment_number:
        raise ValueError(f"segment {segment_number} is not item {segment_number} of the SEG")
    return hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID))


def _volume(value_ml: float, finding_sites: Sequence[hd.sr.FindingSite] | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.VOLUME, value=value_ml, unit=codes.CUBIC_CENTIMETER, finding_sites=finding_sites
    )


def _ratio(percent: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.VOLUME_RATIO, value=percent, unit=codes.PERCENT)


def _mean_hu(mean: float | None) -> list[hd.sr.Measurement]:
    if mean is None:
        return []
    return [
        hd.sr.Measurement(
            name=codes.ATTENUATION_COEFFICIENT,
            value=mean,
            unit=codes.HOUNSFIELD_UNIT,
            derivation=codes.MEAN,
        )
    ]


#: Key of the burden (GGO + high opacity) in :func:`key_points`.
BURDEN_KEY = "burden"
#: Key of the point of the groups without a segment of their own (lung zones, follow-up).
CONTEXT_KEY = "context"


def key_points(masks: dict[int, np.ndarray]) -> dict[int | str, tuple[int, int, int] | None]:
    """A voxel ``(slice, row, column)`` on each finding, in the slice where its area is largest.

    Keys: the segment numbers of ``masks`` (:func:`~lungburden.results.seg.segment_masks`),
    :data:`BURDEN_KEY` and :data:`CONTEXT_KEY` (a second voxel of the burden, in its slice). The
    voxel is the one of the finding nearest to its in-plane centroid that lies at least a sixth
    of the image height above or below the points already placed in the same slice (viewers
    write each point's numbers beside it, so points at similar heights make overlapping labels);
    if none does, the one farthest in height from them. ``None`` for an empty finding.
    """
    findings: dict[int | str, np.ndarray] = dict(masks)
    findings[BURDEN_KEY] = masks[SEGMENT_GGO] | masks[SEGMENT_HIGH_OPACITY]
    min_gap = masks[SEGMENT_LUNG_FIELD].shape[1] / 6
    points: dict[int | str, tuple[int, int, int] | None] = {}
    for key, mask in findings.items():
        areas = mask.sum(axis=(1, 2))
        points[key] = _separated_point(mask, int(np.argmax(areas)), points, min_gap) if areas.any() else None
    anchor = points[BURDEN_KEY]
    burden = findings[BURDEN_KEY]
    points[CONTEXT_KEY] = _separated_point(burden, anchor[0], points, min_gap) if anchor else None
    return points


def _separated_point(mask: np.ndarray, k: int, taken: dict, min_gap: float) -> tuple[int, int, int]:
    rows, cols = np.nonzero(mask[k])
    order = np.argsort((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2, kind="stable")
    others = np.array([p[1] for p in taken.values() if p is not None and p[0] == k])
    if len(others):
        gap = np.abs(rows[:, None] - others[None, :]).min(axis=1)  # labels are written line below line
        apart = order[gap[order] >= min_gap]
        order = apart if len(apart) else order[np.argsort(-gap[order], kind="stable")]
    return (k, int(rows[order[0]]), int(cols[order[0]]))


def _image_region(volume: CTVolume, point: tuple[int, int, int]) -> hd.sr.ImageRegion:
    """SCOORD POINT at the centre of voxel ``point``, SELECTED FROM its source slice (PS3.3 C.18.6)."""
    k, row, col = point
    source = volume.datasets[k]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[col + 0.5, row + 0.5]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        ),
    )


def _fallback_point(volume: CTVolume) -> tuple[int, int, int]:
    k, rows, cols = volume.shape
    return k // 2, rows // 2, cols // 2


def measurement_groups(
    segmentation: hd.seg.Segmentation,
    quantities: Quantities,
    algorithm: AlgorithmInfo,
    burden_tracking_uid: str,
    volume: CTVolume | None = None,
    points: dict[int | str, tuple[int, int, int] | None] | None = None,
    followup: FollowUp | None = None,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """The Imaging Measurements groups (TID 1411 per segment, TID 1501 burden, TID 1410 locations).

    The TID 1410 location groups are added when ``volume`` and ``points`` (:func:`key_points`)
    are given.
    """
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=algorithm_family(algorithm)
    )
    lung_site = [hd.sr.FindingSite(codes.LUNG)]

    def group(
        segment_number: int,
        finding: Code,
        category: Code,
        measurements: list[hd.sr.Measurement],
    ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(segmentation, segment_number),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(segmentation, segment_number),
            finding_type=finding,
            finding_category=category,
            algorithm_id=algorithm_id,
            finding_sites=lung_site,
            measurements=measurements,
        )

    q = quantities
    groups: list = [
        group(
            SEGMENT_LUNG_FIELD,
            codes.LUNG,
            codes.ANATOMICAL_STRUCTURE,
            [
                _volume(q.lung_volume_ml),
                _volume(q.left_lung_volume_ml, [hd.sr.FindingSite(codes.LUNG, laterality=codes.LEFT)]),
                _volume(q.right_lung_volume_ml, [hd.sr.FindingSite(codes.LUNG, laterality=codes.RIGHT)]),
            ],
        ),
        group(
            SEGMENT_GGO,
            codes.GROUND_GLASS_OPACITY,
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            [_volume(q.ggo_volume_ml), _ratio(q.ggo_percent), *_mean_hu(q.ggo_mean_hu)],
        ),
        group(
            SEGMENT_HIGH_OPACITY,
            codes.CONSOLIDATION,
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            [_volume(q.high_opacity_volume_ml), _ratio(q.high_opacity_percent), *_mean_hu(q.high_opacity_mean_hu)],
        ),
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=burden_tracking_uid, identifier=BURDEN_TRACKING_ID),
            finding_type=codes.ABNORMAL_OPACITY,
            finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            algorithm_id=algorithm_id,
            finding_sites=lung_site,
            measurements=[_volume(q.opacity_volume_ml), _ratio(q.burden_percent)],
        ),
    ]
    # Groups without a segment of their own (lung zones): numbers here, locations at the end.
    extra: list = []
    if q.zones is not None:
        extra.append(zone_group(q.zones, algorithm_id, deterministic_uid("tracking", burden_tracking_uid, "zones")))
    if followup is not None:  # priors and the change since the most recent one (sr_followup.py)
        extra += followup_groups(followup, followup.change(q), algorithm_id,
                                 lambda key: deterministic_uid("tracking", burden_tracking_uid, key))
    if volume is None or points is None:
        return groups + extra
    lung_point = points.get(SEGMENT_LUNG_FIELD) or _fallback_point(volume)
    for key, numbers in zip(
        (SEGMENT_LUNG_FIELD, SEGMENT_GGO, SEGMENT_HIGH_OPACITY, BURDEN_KEY), list(groups), strict=True
    ):
        tracking = hd.sr.TrackingIdentifier(uid=numbers.tracking_uid, identifier=_tracking_id(numbers))
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=_image_region(volume, points.get(key) or lung_point),
                finding_type=numbers.finding_type,
                finding_category=_finding_category(numbers),
                algorithm_id=algorithm_id,
                finding_sites=lung_site,
            )
        )
    groups.extend(extra)
    for numbers in extra:  # located on the opacity, in the burden's key slice
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=numbers.tracking_uid, identifier=_tracking_id(numbers)
                ),
                referenced_region=_image_region(volume, points.get(CONTEXT_KEY) or lung_point),
                finding_type=numbers.finding_type,
                finding_category=_finding_category(numbers),
                algorithm_id=algorithm_id,
                finding_sites=lung_site,
            )
        )
    return groups


def _tracking_id(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> str:
    item = next(i for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")
    return str(item.TextValue)


def _finding_category(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> hd.sr.CodedConcept | None:
    for item in group[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "276214006":  # Finding category
            return hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
    return None


def build_measurement_report(
    volume: CTVolume,
    segmentation: hd.seg.Segmentation,
    quantities: Quantities,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 9002,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str = "Pneumonia burden report (lungburden)",
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME,
    software_versions: str | Sequence[str] | None = None,
    device_serial_number: str = "1",
    institution_name: str | None = None,
    is_final: bool = False,
    labels: np.ndarray | None = None,
    followup: FollowUp | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode ``quantities`` as a TID 1500 Measurement Report referencing ``segmentation``.

    ``followup``: the priors and the change since the most recent one (:mod:`.sr_followup`).

    Same patient and study as the source, new series. Evidence (Current Requested Procedure
    Evidence Sequence) lists the source CT instances and the SEG. The document is COMPLETE and
    UNVERIFIED; PRELIMINARY unless ``is_final``. ``labels`` (the label map the SEG encodes)
    places the TID 1410 location points; without it the masks are read back from the SEG.
    """
    if str(segmentation.StudyInstanceUID) != volume.study_instance_uid:
        raise ValueError("the segmentation belongs to another study than the volume")
    if labels is not None:
        masks = segment_masks(labels)
    else:
        masks = _masks_from_segmentation(volume, segmentation)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm, manufacturer),
        procedure_reported=codes.CT_OF_CHEST,
        imaging_measurements=measurement_groups(
            segmentation,
            quantities,
            algorithm,
            burden_tracking_uid=deterministic_uid(
                "tracking", volume.series_instance_uid, algorithm.name, algorithm.version, "burden"
            ),
            volume=volume,
            points=key_points(masks),
            followup=followup,
        ),
    )
    sr = _document(report, [*volume.datasets, segmentation], algorithm, series_number=series_number,
                   instance_number=instance_number, series_instance_uid=series_instance_uid,
                   sop_instance_uid=sop_instance_uid, series_description=series_description,
                   manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
                   software_versions=software_versions, device_serial_number=device_serial_number,
                   institution_name=institution_name, is_final=is_final)
    if followup is not None and followup.priors:
        sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return sr


def _observation_context(algorithm: AlgorithmInfo, manufacturer: str) -> hd.sr.ObservationContext:
    """TID 1002/1004: the algorithm as the device observer."""
    observer = hd.sr.ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def _document(report: hd.sr.MeasurementReport, evidence: Sequence, algorithm: AlgorithmInfo, *,
              series_number: int, instance_number: int, series_instance_uid: str | None,
              sop_instance_uid: str | None, series_description: str, manufacturer: str,
              manufacturer_model_name: str, software_versions: str | Sequence[str] | None,
              device_serial_number: str, institution_name: str | None, is_final: bool) -> hd.sr.Comprehensive3DSR:
    """``report`` in a Comprehensive 3D SR of the evidence's patient and study, new series;
    COMPLETE and UNVERIFIED, PRELIMINARY unless ``is_final``."""
    if software_versions is None:
        software_versions = (lungburden.__version__, algorithm.version)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sr = hd.sr.Comprehensive3DSR(
            evidence=list(evidence),
            content=report,
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=is_final,
            is_verified=False,
            institution_name=institution_name,
            contributing_equipment=[algorithm_equipment(algorithm, manufacturer=manufacturer)],
            series_description=series_description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions if isinstance(software_versions, str) else list(software_versions),
            device_serial_number=device_serial_number,
        )
    drop_incomplete_references(sr)
    return sr


def build_refusal_report(
    volume: CTVolume,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 9002,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str = "Pneumonia burden not reported (lungburden)",
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report without measurements, for a series whose result the quality
    checks refused: procedure, observer and evidence (the source CT) as in
    :func:`build_measurement_report`; the reasons follow as Qualitative Evaluations
    (:func:`lungburden.quality.add_to_sr`). Tells the reporting system that the series was
    received and why it has no numbers."""
    # TID 1500 needs Imaging Measurements, Derived Imaging Measurements or Qualitative Evaluations
    # (the reasons, added after this); highdicom builds the first only: a placeholder group is
    # built and its container removed.
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="no measurements"))
    report = hd.sr.MeasurementReport(observation_context=_observation_context(algorithm, manufacturer),
                                     procedure_reported=codes.CT_OF_CHEST, imaging_measurements=[placeholder])
    root = report[0]
    root.ContentSequence = hd.sr.ContentSequence(
        [item for item in root.ContentSequence
         if item.ConceptNameCodeSequence[0].CodeValue != pydicom_codes.DCM.ImagingMeasurements.value],
        is_root=False)
    return _document(report, volume.datasets, algorithm, series_number=series_number, instance_number=1,
                     series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
                     series_description=series_description, manufacturer=manufacturer,
                     manufacturer_model_name=manufacturer_model_name, software_versions=None,
                     device_serial_number="1", institution_name=None, is_final=False)


def _masks_from_segmentation(volume: CTVolume, segmentation: hd.seg.Segmentation) -> dict[int, np.ndarray]:
    """Segment masks on the volume grid, read from the SEG frames by source instance."""
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in volume.datasets],
        segment_numbers=[SEGMENT_LUNG_FIELD, SEGMENT_GGO, SEGMENT_HIGH_OPACITY],
    )
    return {number: pixels[..., index].astype(bool) for index, number in enumerate(
        (SEGMENT_LUNG_FIELD, SEGMENT_GGO, SEGMENT_HIGH_OPACITY))}
