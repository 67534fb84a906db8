"""The segmenter interface: a volume in, a label map on the source grid out.

:class:`Segmenter` is what the pipeline calls; :class:`AlgorithmInfo` is what SEG and SR record
about it. Concrete segmenters live beside this module and are found by name through
:mod:`lungburden.segmentation.registry`. Imports neither torch nor any segmenter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lungburden.dicom_io.volume import CTVolume


@dataclass(frozen=True)
class AlgorithmInfo:
    """What SEG/SR record about the algorithm (PS3.3 C.8.20.2 Algorithm Identification)."""

    name: str
    version: str
    family: str = "Artificial Intelligence"
    parameters: dict[str, str] | None = None
    #: File name and SHA-256 of the network weights (None for segmenters without weights).
    weights_file: str | None = None
    weights_sha256: str | None = None


class Segmenter(Protocol):
    """Maps a :class:`CTVolume` to a ``uint8`` label map of the same shape (see labels.py)."""

    info: AlgorithmInfo

    def segment(self, volume: CTVolume) -> np.ndarray: ...


#: Arithmetic of a network segmenter's convolutions: ``auto`` = bfloat16 where the CPU has it natively.
PRECISIONS = ("auto", "float32", "bfloat16")
#: Environment variable giving the default precision of network segmenters (node, plugin, CLI).
PRECISION_ENV = "LUNGBURDEN_PRECISION"


def requested_precision(precision: str | None = None) -> str:
    """The requested precision, checked (``None``: ``$LUNGBURDEN_PRECISION``, else ``auto``).

    Raises ``ValueError`` naming where a bad value came from; imports no torch, so that the node
    can check the environment at start-up (``lungburden serve``)."""
    source = "precision"
    if precision is None and os.environ.get(PRECISION_ENV):
        precision, source = os.environ[PRECISION_ENV], f"${PRECISION_ENV}"
    requested = str(precision or "auto").strip().lower()
    if requested not in PRECISIONS:
        raise ValueError(f"{source} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return requested
