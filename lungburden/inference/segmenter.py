"""The segmenter interface (volume -> label map on the source grid) and its registry.

Every front door asks :func:`get_segmenter` for a model by name; the default is the ConvLSTM
network of the paper once its weights ship (``DEFAULT_SEGMENTER``).
"""

from __future__ import annotations

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
