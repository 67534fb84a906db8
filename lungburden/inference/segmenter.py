"""The segmenter interface (volume -> label map on the source grid) and its registry.

Every front door asks :func:`get_segmenter` for a model by name; the default is the ConvLSTM
network of the paper once its weights ship (``DEFAULT_SEGMENTER``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lungburden.inference.volume import CTVolume


@dataclass(frozen=True)
class AlgorithmInfo:
    """What SEG/SR record about the algorithm (PS3.3 C.8.20.2 Algorithm Identification)."""

    name: str
    version: str
    family: str = "Artificial Intelligence"
    parameters: dict[str, str] | None = None


class Segmenter(Protocol):
    """Maps a :class:`CTVolume` to a ``uint8`` label map of the same shape (see labels.py)."""

    info: AlgorithmInfo

    def segment(self, volume: CTVolume) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[[], Segmenter]] = {}
DEFAULT_SEGMENTER = "convlstm"
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


def register_segmenter(name: str, factory: Callable[[], Segmenter]) -> None:
    _REGISTRY[name] = factory


def available_segmenters() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_segmenter(name: str | None = None) -> Segmenter:
    """Instantiate the segmenter registered as ``name`` (default: :data:`DEFAULT_SEGMENTER`)."""
    _load_builtin()
    name = name or DEFAULT_SEGMENTER
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _load_builtin() -> None:
    # Imported lazily so that importing the interface does not import torch.
    from lungburden.inference import predict, threshold  # noqa: F401
