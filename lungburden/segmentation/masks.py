"""Binary-mask helpers shared by the segmenters (numpy/scipy only, no torch)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of ``mask`` (scipy's default face connectivity unless
    ``structure`` is given); all False when ``mask`` is empty."""
    components, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return np.zeros(components.shape, bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())
