"""Typed follow-up results: the priors of a study, the change since the most recent one.

A :class:`PriorResult` holds the numbers of one earlier study of the same patient (read from a
lungburden SR or from its analysis); :func:`compare` gives the :class:`Change` of the current
:class:`~lungburden.quantify.Quantities` since a prior. Dates are DICOM DA (``YYYYMMDD``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime

from lungburden.quantify import Quantities

#: The volumes and percentages a prior carries and a change compares (keys of Quantities).
PRIOR_FIELDS: tuple[str, ...] = (
    "lung_volume_ml", "ggo_volume_ml", "high_opacity_volume_ml", "opacity_volume_ml",
    "burden_percent", "ggo_percent", "high_opacity_percent",
)
#: Where a prior's numbers came from.
FROM_SR, FROM_ANALYSIS = "sr", "analysis"


def parse_da(value: str) -> date:
    """A DICOM DA value (``YYYYMMDD``, PS3.5 6.2) as a date; ValueError otherwise."""
    return datetime.strptime(str(value).strip(), "%Y%m%d").date()


@dataclass(frozen=True)
class PriorResult:
    """The numbers of one prior study (volumes in mL, percentages of the lung field)."""

    study_instance_uid: str
    series_instance_uid: str
    study_date: str  # DA
    days_before: int
    lung_volume_ml: float
    ggo_volume_ml: float
    high_opacity_volume_ml: float
    opacity_volume_ml: float
    burden_percent: float
    ggo_percent: float
    high_opacity_percent: float
    source: str  # FROM_SR | FROM_ANALYSIS
    sr_sop_instance_uid: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """Current minus prior: points of burden and of each class's %, mL of each class."""

    prior_study_instance_uid: str
    days: int
    burden_points: float
    ggo_points: float
    high_opacity_points: float
    lung_volume_ml: float
    ggo_volume_ml: float
    high_opacity_volume_ml: float
    opacity_volume_ml: float

    @property
    def direction(self) -> str:
        """``increased`` / ``decreased`` / ``unchanged`` burden (within 0.5 points: unchanged)."""
        if self.burden_points > 0.5:
            return "increased"
        if self.burden_points < -0.5:
            return "decreased"
        return "unchanged"

    def to_dict(self) -> dict:
        return {**asdict(self), "direction": self.direction}


def compare(current: Quantities, prior: PriorResult) -> Change:
    """The :class:`Change` of ``current`` since ``prior``."""

    def diff(name: str) -> float:
        return round(float(getattr(current, name)) - float(getattr(prior, name)), 3)

    return Change(
        prior_study_instance_uid=prior.study_instance_uid,
        days=prior.days_before,
        burden_points=diff("burden_percent"),
        ggo_points=diff("ggo_percent"),
        high_opacity_points=diff("high_opacity_percent"),
        lung_volume_ml=diff("lung_volume_ml"),
        ggo_volume_ml=diff("ggo_volume_ml"),
        high_opacity_volume_ml=diff("high_opacity_volume_ml"),
        opacity_volume_ml=diff("opacity_volume_ml"),
    )


@dataclass(frozen=True)
class FollowUp:
    """The priors of the current study (most recent first) and the change since the first one.

    ``note`` says why there are no priors (none found, identifiers missing or ambiguous, PACS
    unreachable); ``skipped`` lists priors that could not be used, with the reason.
    """

    study_date: str
    priors: tuple[PriorResult, ...] = ()
    note: str | None = None
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def change(self, current: Quantities) -> Change | None:
        return compare(current, self.priors[0]) if self.priors else None

    def trend(self, current: Quantities) -> list[tuple[int, float]]:
        """(days relative to the current study, burden %) from the oldest prior to the current."""
        points = [(-p.days_before, p.burden_percent) for p in reversed(self.priors)]
        return [*points, (0, current.burden_percent)]

    def to_dict(self, current: Quantities) -> dict:
        """The ``priors`` and ``change_since_prior`` entries of result.json (+ ``priors_note``)."""
        change = self.change(current)
        out: dict = {"priors": [p.to_dict() for p in self.priors],
                     "change_since_prior": change.to_dict() if change is not None else None}
        if self.note:
            out["priors_note"] = self.note
        if self.skipped:
            out["priors_skipped"] = list(self.skipped)
        return out
