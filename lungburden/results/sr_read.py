"""Read the numbers back from a lungburden TID 1500 SR (PS3.16 TID 1500/1411/1501) with pydicom.

Used for priors: a lungburden SR already in the PACS gives the prior's volumes and percentages
without analysing its images again. Only SRs whose device observer (TID 1004, DCM 121015 Device
Observer Model Name) is ``"<algorithm name> <version>"`` of the current algorithm are used.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from lungburden.results.seg import MANUFACTURER

#: Finding (CodeValue) -> the Quantities field prefix of the group's Volume and Volume Ratio.
_GROUPS = {"39607008": "lung", "112120": "ggo", "95436008": "high_opacity", "112033": "opacity"}
_VOLUME, _RATIO = "118565006", "113288"
_IMAGING_MEASUREMENTS, _FINDING, _TRACKING_ID = "126010", "121071", "112039"
_DEVICE_MODEL_NAME = "121015"
_CT_IMAGE_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


@dataclass(frozen=True)
class SRNumbers:
    """What a lungburden SR says about its source series."""

    device_model_name: str
    source_series_instance_uid: str | None
    values: dict[str, float]


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeValue) if seq else ""


def _has_modifier(item: Dataset) -> bool:
    """A NUM with a finding site below it (left/right lung, a zone): not the group total."""
    return bool(item.get("ContentSequence"))


def read_sr_numbers(sr: Dataset) -> SRNumbers | None:
    """The numbers of a lungburden SR, or ``None`` for another SR or one without measurements.

    Keys: ``lung_volume_ml``, ``ggo_volume_ml``, ``high_opacity_volume_ml``, ``opacity_volume_ml``,
    ``ggo_percent``, ``high_opacity_percent``, ``burden_percent`` (those present).
    """
    if str(sr.get("Manufacturer", "")) != MANUFACTURER:
        return None
    model_name = next((str(i.TextValue) for i in sr.get("ContentSequence", [])
                       if _code(i) == _DEVICE_MODEL_NAME and "TextValue" in i), "")
    values: dict[str, float] = {}
    for container in sr.get("ContentSequence", []):
        if _code(container) != _IMAGING_MEASUREMENTS:
            continue
        for group in container.get("ContentSequence", []):
            items = list(group.get("ContentSequence", []))
            finding = next((_code(i, "ConceptCodeSequence") for i in items if _code(i) == _FINDING), "")
            tracking = next((str(i.TextValue) for i in items if _code(i) == _TRACKING_ID and "TextValue" in i), "")
            prefix = _GROUPS.get(finding)
            if prefix is None or tracking not in ("Lung field", "Ground glass opacity", "High opacity",
                                                  "Pneumonia burden"):
                continue
            for item in items:
                if item.get("ValueType") != "NUM" or _has_modifier(item) or "MeasuredValueSequence" not in item:
                    continue
                value = float(item.MeasuredValueSequence[0].NumericValue)
                if _code(item) == _VOLUME:
                    values.setdefault(f"{prefix}_volume_ml", value)
                elif _code(item) == _RATIO:
                    values.setdefault("burden_percent" if prefix == "opacity" else f"{prefix}_percent", value)
    if "burden_percent" not in values:
        return None
    return SRNumbers(model_name, _source_series(sr), values)


def _source_series(sr: Dataset) -> str | None:
    """The CT series of the evidence (Current Requested Procedure Evidence Sequence)."""
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            refs = series.get("ReferencedSOPSequence", [])
            if refs and str(refs[0].ReferencedSOPClassUID) in _CT_IMAGE_STORAGE:
                return str(series.SeriesInstanceUID)
    return None
