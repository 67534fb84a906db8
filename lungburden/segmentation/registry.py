"""Segmenters by name: what every front door (CLI, node, plugin, evaluation) asks for.

Built-in segmenters are named here by module path and imported on first use, so that importing
the registry imports no torch. ``weights`` selects a network checkpoint other than the shipped
one (``lungburden analyze --weights``, ``processing.weights`` of the node and the plugin).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from lungburden.segmentation.base import Segmenter

#: The default segmenter: the paper's ConvLSTM network with the shipped weights.
DEFAULT_SEGMENTER = "convlstm"

#: name -> "module:attribute" of a callable ``(weights=None) -> Segmenter``.
_BUILTIN = {
    "convlstm": "lungburden.segmentation.convlstm:ConvLSTMSegmenter",
    "threshold": "lungburden.segmentation.threshold:ThresholdSegmenter",
}
#: Segmenters that take a weights file.
_WEIGHTED = {"convlstm"}
_EXTRA: dict[str, Callable[..., Segmenter]] = {}


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Make ``factory`` available as ``name`` (for third-party segmenters)."""
    _EXTRA[name] = factory


def available_segmenters() -> list[str]:
    return sorted({*_BUILTIN, *_EXTRA})


def get_segmenter(name: str | None = None, weights: str | os.PathLike[str] | None = None) -> Segmenter:
    """Instantiate the segmenter ``name`` (default :data:`DEFAULT_SEGMENTER`), with the network
    weights file ``weights`` when given (default: the shipped weights).

    Raises ``KeyError`` for an unknown name and ``ValueError`` when ``weights`` is given for a
    segmenter without weights.
    """
    name = name or DEFAULT_SEGMENTER
    if name in _EXTRA:
        factory = _EXTRA[name]
    elif name in _BUILTIN:
        module, attribute = _BUILTIN[name].split(":")
        factory = getattr(importlib.import_module(module), attribute)
    else:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_segmenters())}")
    if weights is None:
        return factory()
    if name not in _WEIGHTED and name not in _EXTRA:
        raise ValueError(f"model {name!r} takes no weights file")
    return factory(weights)
