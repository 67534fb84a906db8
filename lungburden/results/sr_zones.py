"""The lung-zone group of the TID 1500 SR (PS3.16 TID 1501 Measurement Group).

One group "Lung zones" (finding DCM 112033 Abnormal opacity, site Lung) holds, for each of the
six zones, the involvement as Volume Ratio [%] and the 0-5 severity score as Score [1], each with
the finding site Upper / Middle / Lower zone of lung (CID 6171) and Laterality (CID 244); then the
total score (0-30) with the finding site Lung. The zones are equal-height thirds of each lung
(:mod:`lungburden.quantify`), not the anatomical lobes.
"""

from __future__ import annotations

import highdicom as hd

from lungburden.quantify import ZoneInvolvement
from lungburden.results import codes

#: Tracking identifier (TID 4108) of the zone group.
ZONES_TRACKING_ID = "Lung zones"
_LATERALITY = {"left": codes.LEFT, "right": codes.RIGHT}


def zone_measurements(zones: ZoneInvolvement) -> list[hd.sr.Measurement]:
    """Volume Ratio and Score per zone (right lung first, from the head down), then the total."""
    out: list[hd.sr.Measurement] = []
    for zone in zones.zones:
        site = [hd.sr.FindingSite(codes.LUNG_ZONES[zone.zone], laterality=_LATERALITY[zone.lung])]
        out.append(hd.sr.Measurement(name=codes.VOLUME_RATIO, value=zone.involvement_percent,
                                     unit=codes.PERCENT, finding_sites=site))
        out.append(hd.sr.Measurement(name=codes.SCORE, value=zone.score, unit=codes.NO_UNITS, finding_sites=site))
    out.append(hd.sr.Measurement(name=codes.SCORE, value=zones.total_score, unit=codes.NO_UNITS,
                                 finding_sites=[hd.sr.FindingSite(codes.LUNG)]))
    return out


def zone_group(
    zones: ZoneInvolvement, algorithm_id: hd.sr.AlgorithmIdentification, tracking_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 "Lung zones" measurement group."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=ZONES_TRACKING_ID),
        finding_type=codes.ABNORMAL_OPACITY,
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        measurements=zone_measurements(zones),
    )
