"""IHE IOCM rejection notes: a Key Object Selection Document retracting superseded results.

When a later, more complete version of a source series supersedes results already delivered,
the node sends a Key Object Selection Document (PS3.3 A.35.4, SOP Class 1.2.840.10008.5.1.4.1.1.88.59)
with Document Title (113001, DCM, "Rejected for Quality Reasons") whose Current Requested
Procedure Evidence Sequence and content tree reference the superseded SEG, SR, Secondary Captures
and PDF (IHE RAD TF
IOCM, "Rejection Note"). It belongs to the same study (patient and study attributes copied from
the new results), in its own series. Its UIDs are derived from the rejected SOP Instance UIDs,
so re-sending the note stores the same instance again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

#: SOP classes of the node's results.
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: The IOCM rejection note title (CID 7010 Key Object Selection Document Titles).
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")

_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                  "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                  "SpecificCharacterSet")


@dataclass(frozen=True)
class RejectedInstance:
    """One delivered instance to retract."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def rejected_results(result: dict) -> list[RejectedInstance]:
    """The results named by a job's result summary (the UIDs of result.json): SEG, SR, the
    Secondary Captures and the Encapsulated PDF, each when the summary names it."""
    study = result["study_instance_uid"]
    rejected = [RejectedInstance(sop_class, result[f"{key}_sop_instance_uid"], result[f"{key}_series_instance_uid"],
                                 study)
                for key, sop_class in (("seg", SEGMENTATION_STORAGE), ("sr", COMPREHENSIVE_3D_SR_STORAGE),
                                       ("pdf", ENCAPSULATED_PDF_STORAGE))
                if result.get(f"{key}_sop_instance_uid")]
    rejected += [RejectedInstance(SECONDARY_CAPTURE_STORAGE, uid, result["sc_series_instance_uid"], study)
                 for uid in result.get("sc_sop_instance_uids") or []]
    return rejected


def rejection_note_uids(rejected: Sequence[RejectedInstance]) -> tuple[str, str]:
    """Deterministic (Series, SOP) Instance UIDs of the note rejecting ``rejected`` (PS3.5 9.1)."""
    key = sorted(r.sop_instance_uid for r in rejected)
    return (generate_uid(entropy_srcs=["lungburden", "rejection-note", "series", *key]),
            generate_uid(entropy_srcs=["lungburden", "rejection-note", "sop", *key]))


def build_rejection_note(
    study_source: Dataset,
    rejected: Sequence[RejectedInstance],
    description: str,
    *,
    manufacturer: str = "lungburden",
    series_number: int = 9003,
) -> Dataset:
    """The rejection note for ``rejected`` (all in the study of ``study_source``, e.g. the new SEG).

    ``description``: the Key Object Description text (why the results are withdrawn).
    """
    import highdicom as hd

    if not rejected:
        raise ValueError("nothing to reject")
    study_uid = str(study_source.StudyInstanceUID)
    if any(r.study_instance_uid != study_uid for r in rejected):
        raise ValueError("rejected instances of another study")
    stubs = []
    for r in rejected:
        ds = Dataset()
        for keyword in _PATIENT_STUDY:
            if keyword in study_source:
                setattr(ds, keyword, study_source.data_element(keyword).value)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime"):
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.SOPClassUID, ds.SOPInstanceUID = r.sop_class_uid, r.sop_instance_uid
        ds.SeriesInstanceUID = r.series_instance_uid
        ds.Modality = "SEG" if r.sop_class_uid == SEGMENTATION_STORAGE else "SR"
        stubs.append(ds)
    series_uid, sop_uid = rejection_note_uids(rejected)
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=stubs, description=description[:1024],
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=stubs, content=content, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=manufacturer,
        series_description="Rejection note (lungburden)",
    )
    return note
