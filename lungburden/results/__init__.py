"""DICOM results: SEG (PS3.3 A.51) and TID 1500 SR (PS3.16) built with highdicom, plus validators.

Encoding functions build datasets in memory; :func:`write_dataset` writes them. See
docs/conformance.md for the IODs, codes and remaining validator warnings.
"""

from lungburden.results.seg import SEGMENTS, build_segmentation, segment_masks, write_dataset
from lungburden.results.sr import build_measurement_report

__all__ = [
    "SEGMENTS",
    "build_measurement_report",
    "build_segmentation",
    "segment_masks",
    "write_dataset",
]
