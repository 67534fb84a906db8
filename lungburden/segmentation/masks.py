"""Binary-mask helpers shared by the segmenters and their finishing steps (numpy/scipy only, no torch)."""

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


#: In-plane 4-neighbourhood as a 3-D structure (one slice thick).
PLANE = np.zeros((3, 3, 3), bool)
PLANE[1] = ndimage.generate_binary_structure(2, 1)
#: 26-connectivity in 3-D.
CUBE = np.ones((3, 3, 3), bool)


def bounding_crop(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis (None if it is empty)."""
    axes = [np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    if not axes[0].size:
        return None
    return tuple(slice(max(int(a[0]) - m, 0), int(a[-1]) + m + 1) for a, m in zip(axes, margin, strict=True))


def component_shell(components: np.ndarray, index: int,
                     box: tuple[slice, ...]) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Component ``index`` of a labelled array (``box`` from ``ndimage.find_objects``): its box
    grown by one voxel, its mask in that box and its 26-neighbour shell there."""
    grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    member = components[grown] == index
    return grown, member, ndimage.binary_dilation(member, structure=CUBE) & ~member


def dilate_in_plane(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one in-plane 4-neighbour step (the binary dilation with
    :data:`PLANE`, by four shifted ORs: several times faster on a thorax-sized box)."""
    out = mask.copy()
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out
