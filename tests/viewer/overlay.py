"""Where a viewer draws a segmentation overlay, compared with the SEG's own pixels.

The screen mapping comes from the source CT slice alone: the image-index coordinates (column,
row) of a pixel centre go to patient coordinates through Image Position / Orientation (Patient)
and Pixel Spacing, and from there to page pixels through the viewer's world-to-canvas transform
(:func:`screen_affine`). The SEG mask is then resampled onto the screen (nearest pixel,
:class:`ScreenMapping`) and
compared with the pixels that change colour when the overlay is switched on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

#: A screen pixel counts as overlay-coloured when a channel changes by at least this much.
COLOUR_STEP = 10
#: Agreement required between drawn and expected overlay pixels.
MIN_DICE = 0.95
#: Mismatching pixels tolerated whatever the Dice (tiny regions, anti-aliased edges).
MAX_STRAY_PIXELS = 25


def pixel_to_patient(ds: Dataset, col: float, row: float) -> list[float]:
    """Patient coordinates (mm) of the image-index point (``col``, ``row``) of CT slice ``ds``."""
    origin = np.asarray(ds.ImagePositionPatient, float)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return (origin + col * col_spacing * iop[:3] + row * row_spacing * iop[3:]).tolist()


def screen_affine(canvas_points: list[list[float]], canvas_origin: tuple[float, float]) -> np.ndarray:
    """2 × 3 affine from image index (col, row, 1) to page pixels.

    ``canvas_points``: the canvas positions of the pixel centres (0, 0), (1, 0) and (0, 1);
    ``canvas_origin``: the canvas' top-left corner on the page.
    """
    (x0, y0), (x1, y1), (x2, y2) = canvas_points
    ox, oy = canvas_origin
    return np.array([[x1 - x0, x2 - x0, x0 + ox], [y1 - y0, y2 - y0, y0 + oy]])


class ScreenMapping:
    """The image pixel (nearest) under each page pixel of ``region`` (x, y, width, height)."""

    def __init__(self, affine: np.ndarray, region: tuple[int, int, int, int], image_shape: tuple[int, int]):
        x, y, width, height = region
        self.region = region
        inverse = np.linalg.inv(np.vstack([affine, [0.0, 0.0, 1.0]]))
        ys, xs = np.mgrid[y:y + height, x:x + width]
        centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
        col, row = np.rint(inverse[:2, :2] @ centres + inverse[:2, 2:3]).astype(int)
        self.inside = (col >= 0) & (col < image_shape[1]) & (row >= 0) & (row < image_shape[0])
        self.row, self.col = row[self.inside], col[self.inside]

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (rows × columns of the image) as the region's page pixels."""
        out = np.zeros(self.inside.shape, bool)
        out[self.inside] = mask[self.row, self.col]
        return out.reshape(self.region[3], self.region[2])


def overlay_pixels(on: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Pixels whose colour the overlay changes (two screenshots of the same region)."""
    return np.abs(on.astype(np.int16) - off.astype(np.int16)).max(axis=2) >= COLOUR_STEP


@dataclass
class Agreement:
    name: str
    drawn: int
    expected: int
    dice: float
    stray: int  # pixels drawn but not expected, or expected but not drawn

    @property
    def ok(self) -> bool:
        return self.dice >= MIN_DICE or self.stray <= MAX_STRAY_PIXELS

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"{self.name}: {verdict} (dice {self.dice:.3f}, {self.stray} stray pixels, "
                f"{self.drawn} drawn, {self.expected} expected)")


def agreement(name: str, drawn: np.ndarray, expected: np.ndarray) -> Agreement:
    total = int(drawn.sum() + expected.sum())
    both = int((drawn & expected).sum())
    dice = 1.0 if total == 0 else 2.0 * both / total
    return Agreement(name, int(drawn.sum()), int(expected.sum()), dice, int((drawn ^ expected).sum()))
