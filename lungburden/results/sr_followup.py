"""The comparison with prior studies in the TID 1500 SR (PS3.16 TID 1501 Measurement Groups).

Per prior (most recent first) one group "Prior study YYYY-MM-DD": finding DCM 112033 Abnormal
opacity, site Lung; HAS OBS CONTEXT UIDREF DCM 121018 "Procedure Study Instance UID" = the prior
study (TID 1005), Time Point Context (TID 1502) with the prior's date; NUM Volume Ratio [%] (its
burden), NUM Volume [cm3] (its opacity volume), NUM SCT 385673002 Interval [d] (days before the
current study).

Then one group "Change since prior study" (current minus the most recent prior), with the same
UIDREF and Interval, and the differences as NUMs of the lungburden coding scheme
:data:`SCHEME` (PS3.16 8.1 private coding scheme, identified in the Coding Scheme
Identification Sequence): no standard concept names "change in percentage points of a volume
ratio since a prior study".
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from lungburden.followup.trend import Change, FollowUp, PriorResult
from lungburden.results import codes

#: The private coding scheme of the change concepts (CodingSchemeDesignator, PS3.16 8.1).
SCHEME = "99LUNGBURDEN"
CHANGE_TRACKING_ID = "Change since prior study"
PRIOR_TRACKING_PREFIX = "Prior study "

#: Change concepts: (code, meaning, unit, Change attribute).
CHANGE_CONCEPTS: tuple[tuple[Code, Code, str], ...] = (
    (Code("CHG-BURDEN", SCHEME, "Change in pneumonia burden"), codes.PERCENT, "burden_points"),
    (Code("CHG-GGO-PCT", SCHEME, "Change in ground glass opacity percentage"), codes.PERCENT, "ggo_points"),
    (Code("CHG-HIGH-PCT", SCHEME, "Change in high opacity percentage"), codes.PERCENT, "high_opacity_points"),
    (Code("CHG-LUNG-VOL", SCHEME, "Change in lung field volume"), codes.CUBIC_CENTIMETER, "lung_volume_ml"),
    (Code("CHG-GGO-VOL", SCHEME, "Change in ground glass opacity volume"), codes.CUBIC_CENTIMETER,
     "ggo_volume_ml"),
    (Code("CHG-HIGH-VOL", SCHEME, "Change in high opacity volume"), codes.CUBIC_CENTIMETER,
     "high_opacity_volume_ml"),
    (Code("CHG-OPACITY-VOL", SCHEME, "Change in opacity volume"), codes.CUBIC_CENTIMETER, "opacity_volume_ml"),
)


def _iso(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 else da


def _study_reference(study_uid: str) -> hd.sr.UIDRefContentItem:
    return hd.sr.UIDRefContentItem(name=codes.PROCEDURE_STUDY_INSTANCE_UID, value=study_uid,
                                   relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT)


def _interval(days: int) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.INTERVAL, value=days, unit=codes.DAY)


def _group(tracking: hd.sr.TrackingIdentifier, algorithm_id: hd.sr.AlgorithmIdentification, study_uid: str,
           measurements: list[hd.sr.Measurement], time_point: str | None = None
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        time_point_context=hd.sr.TimePointContext(time_point=time_point) if time_point else None,
        finding_type=codes.ABNORMAL_OPACITY,
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        measurements=measurements,
    )
    # After the Tracking Identifier/UID: the study the numbers belong to (TID 1005 row).
    group[0].ContentSequence.insert(2, _study_reference(study_uid))
    return group


def prior_group(prior: PriorResult, algorithm_id: hd.sr.AlgorithmIdentification, tracking_uid: str
                ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The numbers of one prior study."""
    return _group(
        hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=PRIOR_TRACKING_PREFIX + _iso(prior.study_date)),
        algorithm_id, prior.study_instance_uid,
        [hd.sr.Measurement(name=codes.VOLUME_RATIO, value=prior.burden_percent, unit=codes.PERCENT),
         hd.sr.Measurement(name=codes.VOLUME, value=prior.opacity_volume_ml, unit=codes.CUBIC_CENTIMETER),
         _interval(prior.days_before)],
        time_point=_iso(prior.study_date),
    )


def change_group(change: Change, algorithm_id: hd.sr.AlgorithmIdentification, tracking_uid: str
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Current minus the most recent prior."""
    return _group(
        hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=CHANGE_TRACKING_ID),
        algorithm_id, change.prior_study_instance_uid,
        [*(hd.sr.Measurement(name=name, value=getattr(change, attribute), unit=unit)
           for name, unit, attribute in CHANGE_CONCEPTS), _interval(change.days)],
    )


def followup_groups(followup: FollowUp, change: Change | None, algorithm_id: hd.sr.AlgorithmIdentification,
                    tracking_uid) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Prior groups (most recent first) and the change group; ``tracking_uid(key)`` gives the UIDs."""
    groups = [prior_group(p, algorithm_id, tracking_uid(f"prior/{p.study_instance_uid}")) for p in followup.priors]
    if change is not None:
        groups.append(change_group(change, algorithm_id, tracking_uid("change")))
    return groups


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification Sequence item of :data:`SCHEME` (PS3.3 C.12.1)."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "lungburden follow-up concepts"
    item.CodingSchemeResponsibleOrganization = "lungburden"
    return item
