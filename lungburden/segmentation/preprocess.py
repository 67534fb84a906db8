"""Network input preparation and its inverse (paper section 2.4).

Forward (:func:`preprocess`): the slices are cropped to the body, resized to ``size × size`` and
windowed, as in section 2.4:

1. body mask = largest 3-D connected component of HU > ``-500`` (computed on a 4× in-plane
   subsampled grid; only its bounding box is used), one bounding box for the whole series (so
   every slice of a window has the same scale, which the ConvLSTM relies on), grown by a margin
   and made square by padding the short side (padding outside the image reads as air);
2. HU clipped to [-1024, 600] and min-max scaled to [0, 1] with those fixed bounds (identical to
   per-volume min-max after clipping whenever the series reaches both bounds, which chest CT
   does; fixed bounds keep it deterministic);
3. each slice resized to ``size × size`` (bilinear with antialiasing, i.e. area-like).

Inverse (:func:`logits_to_labels`, :func:`to_source_grid`): class maps on the model grid are
resized (bilinear) into the crop square, cut to the image, and everything outside the crop box
is background. Labels are taken by argmax *after* upsampling, so boundaries are sub-pixel.

Training data use the same functions: :func:`labels_to_model_grid` maps a ground-truth label map
onto the model grid, and :func:`window_indices` gives the context slices of a target slice with
the edge policy of the segmenter (replicate the first/last slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lungburden.segmentation.masks import largest_component

HU_MIN = -1024.0
HU_MAX = 600.0
BODY_THRESHOLD_HU = -500.0
#: Default model resolution S (the paper uses 256; docs/model-development.md explains 160).
DEFAULT_SIZE = 160


@dataclass(frozen=True)
class CropBox:
    """A square in source pixel indices; it may extend past the image (that part is air)."""

    row0: int
    col0: int
    side: int

    def clipped(self, rows: int, cols: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)``: the part of the square inside a ``rows × cols`` image."""
        return (max(self.row0, 0), min(self.row0 + self.side, rows),
                max(self.col0, 0), min(self.col0 + self.side, cols))

    def inside(self, rows: int, cols: int) -> tuple[slice, slice]:
        """The same part as :meth:`clipped`, as (row, column) slices in the square's own pixels
        (empty when the square misses the image)."""
        r0, r1, c0, c1 = self.clipped(rows, cols)
        return (slice(r0 - self.row0, max(r1, r0) - self.row0),
                slice(c0 - self.col0, max(c1, c0) - self.col0))


@dataclass
class PreprocessedSeries:
    """The normalised network input of one series and how to map results back.

    ``image``: float32 tensor ``(slices, size, size)`` in [0, 1]; ``box``: the crop square on the
    source grid; ``source_shape``: ``(slices, rows, cols)`` of the source volume.
    """

    image: torch.Tensor
    box: CropBox
    source_shape: tuple[int, int, int]
    #: The body component the box was found from (:func:`coarse_body`), reused by
    #: :func:`clear_outside_body`; None when the box was given.
    body: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


#: Below this, a background region that reaches the image edge counts as the air around the patient.
OUTSIDE_AIR_HU = -950.0


#: In-plane subsampling of the body component (4 = 3 mm at 0.8 mm pixels) and the crop margin.
BODY_STEP, BODY_MARGIN = 4, 8


def coarse_body(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU, step: int = BODY_STEP) -> np.ndarray:
    """Largest 3-D component of ``hu > threshold`` on the ``step``-subsampled in-plane grid
    (all False without any voxel above the threshold)."""
    return largest_component(hu[:, ::step, ::step] > threshold)


def clear_outside_body(labels: np.ndarray, hu: np.ndarray, body: np.ndarray | None = None,
                       step: int = BODY_STEP, series_has_body: bool | None = None) -> np.ndarray:
    """Set ``labels`` to background outside the patient's body, in place; returns ``labels``.

    The body is the component of :func:`body_box` with its holes (lungs, airways) filled slice by
    slice; a network can take the foam of the couch or a blanket for lung, which would enter the
    burden denominator. A hole that reaches the image edge (a lung cut by a reduced field of view
    or a crop) stays inside unless it is mostly air (< -950 HU: the room around the patient, with
    the couch and blankets in it). On the ``step`` grid (3 mm at 0.8 mm pixels), far from any
    lung edge. ``body``: the :func:`coarse_body` of ``hu`` if already computed (preprocessing).
    Without any body in the series, everything is cleared. The test is per slice, so a run of
    slices of a series (with the matching slices of the series' ``body``, and
    ``series_has_body``: whether the whole series has one) gets its share of the whole-series
    result.
    """
    if body is None:
        body = coarse_body(hu, step=step)
    if not (body.any() if series_has_body is None else series_has_body):
        labels[...] = 0
        return labels
    n, rows, cols = labels.shape
    # Background components per slice (in-plane connectivity); those reaching the image edge
    # and mostly air-like are the outside.
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~body, structure=plane)
    edge = np.unique(np.concatenate([background[:, 0].ravel(), background[:, -1].ravel(),
                                     background[:, :, 0].ravel(), background[:, :, -1].ravel()]))
    edge = edge[edge > 0]
    outside = np.zeros(count + 1, bool)
    if edge.size:
        air_share = np.asarray(ndimage.mean(hu[:, ::step, ::step] < OUTSIDE_AIR_HU, background, edge))
        outside[edge[air_share > 0.5]] = True
    inside = ~outside[background]
    if labels.flags.c_contiguous and rows % step == 0 and cols % step == 0:
        # Broadcast the coarse mask over the step x step blocks of the label map (a view).
        blocks = labels.reshape(n, rows // step, step, cols // step, step)
        np.multiply(blocks, inside[:, :, None, :, None], out=blocks)
        return labels
    for k in range(n):
        labels[k] *= np.repeat(np.repeat(inside[k], step, axis=0), step, axis=1)[:rows, :cols]
    return labels


def body_box(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU, step: int = BODY_STEP,
             margin: int = BODY_MARGIN) -> CropBox:
    """Square bounding box (source pixels) of the body over the whole series (section 2.4).

    The body is the largest 3-D component of ``hu > threshold`` on a ``step``-subsampled in-plane
    grid; the box is grown by ``margin + step`` pixels and centred-padded to a square. Without a
    body (blank series), the whole image is used.
    """
    return _box_around(coarse_body(hu, threshold, step), hu.shape[1], hu.shape[2], step, margin)


def _box_around(body: np.ndarray, rows: int, cols: int, step: int, margin: int) -> CropBox:
    """The square crop of :func:`body_box` around a :func:`coarse_body` mask."""
    if not body.any():
        side = max(rows, cols)
        return CropBox((rows - side) // 2, (cols - side) // 2, side)
    rr = np.flatnonzero(body.any(axis=(0, 2)))
    cc = np.flatnonzero(body.any(axis=(0, 1)))
    pad = margin + step
    r0, r1 = max(int(rr[0]) * step - pad, 0), min(int(rr[-1]) * step + pad + 1, rows)
    c0, c1 = max(int(cc[0]) * step - pad, 0), min(int(cc[-1]) * step + pad + 1, cols)
    side = max(r1 - r0, c1 - c0)
    return CropBox(r0 - (side - (r1 - r0)) // 2, c0 - (side - (c1 - c0)) // 2, side)


def _crop_square(x: torch.Tensor, box: CropBox, fill: float) -> torch.Tensor:
    """Cut ``box`` out of ``(n, rows, cols)`` ``x``, padding the part outside the image."""
    rows, cols = x.shape[-2:]
    r0, r1, c0, c1 = box.clipped(rows, cols)
    x = x[..., r0:r1, c0:c1]
    in_rows, in_cols = box.inside(rows, cols)
    pads = (in_cols.start, box.side - in_cols.stop, in_rows.start, box.side - in_rows.stop)
    if any(pads):
        x = F.pad(x, pads, value=fill)
    return x


def normalise_slices(hu: np.ndarray, box: CropBox, size: int) -> torch.Tensor:
    """HU slices ``(n, rows, cols)`` (any real dtype) → crop, clip, min-max, resize: float32
    ``(n, size, size)``.

    The clipped crop is written once into a ``HU_MIN``-filled square; the min-max scaling, an
    affine map, is applied after the resize (which commutes with it: its weights sum to 1, so
    up to float rounding, ~1e-7), on the small grid.
    """
    t = torch.from_numpy(np.asarray(hu))
    rows, cols = t.shape[-2:]
    r0, r1, c0, c1 = box.clipped(rows, cols)
    square = torch.full((t.shape[0], box.side, box.side), HU_MIN, dtype=torch.float32)
    if r1 > r0 and c1 > c0:  # else the box lies wholly outside the image: all air
        inner = square[(slice(None), *box.inside(rows, cols))]
        crop = t[:, r0:r1, c0:c1]
        if crop.dtype == torch.float32:
            torch.clamp(crop, HU_MIN, HU_MAX, out=inner)
        else:  # integers, float64, float16: converted on the copy
            inner.copy_(crop).clamp_(HU_MIN, HU_MAX)
    if box.side != size:
        square = F.interpolate(square[:, None], size=(size, size), mode="bilinear", align_corners=False,
                               antialias=box.side > size)[:, 0]
    return square.sub_(HU_MIN).mul_(1.0 / (HU_MAX - HU_MIN)).clamp_(0.0, 1.0).contiguous()


def preprocess(hu: np.ndarray, size: int = DEFAULT_SIZE, box: CropBox | None = None,
               chunk: int = 64) -> PreprocessedSeries:
    """Section 2.4 preprocessing of a whole series ``hu`` ``(slices, rows, cols)`` in HU.

    Works in chunks of ``chunk`` slices (converted to float32 chunk by chunk), so that only the
    small model-grid stack is held in full.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {hu.shape}")
    body = None
    if box is None:
        body = coarse_body(hu)
        box = _box_around(body, hu.shape[1], hu.shape[2], BODY_STEP, BODY_MARGIN)
    out = torch.empty((hu.shape[0], size, size), dtype=torch.float32)
    for a in range(0, hu.shape[0], chunk):
        out[a:a + chunk] = normalise_slices(hu[a:a + chunk], box, size)
    return PreprocessedSeries(image=out, box=box, source_shape=tuple(int(s) for s in hu.shape), body=body)


def to_source_grid(maps: torch.Tensor, box: CropBox, rows: int, cols: int) -> torch.Tensor:
    """Bilinear resize of ``(n, C, size, size)`` model-grid maps into the crop box.

    Returns ``(n, C, r1 - r0, c1 - c0)`` for the part of the box inside the image (see
    :meth:`CropBox.clipped`); the caller fills the rest of the source grid.
    """
    up = F.interpolate(maps, size=(box.side, box.side), mode="bilinear", align_corners=False)
    return up[(slice(None), slice(None), *box.inside(rows, cols))]


def logits_to_labels(logits: torch.Tensor, box: CropBox, rows: int, cols: int,
                     out: np.ndarray | None = None, step: int = 16) -> np.ndarray:
    """Model-grid logits ``(n, C, size, size)`` → ``uint8`` labels ``(n, rows, cols)``.

    The labels are the argmax of the logits upsampled bilinearly into the crop box (the
    ``align_corners=False`` sampling of :func:`to_source_grid`); outside the box the label is 0
    (background). ``out`` is written in place when given; ``step`` slices at a time.

    Computed without upsampling every class map: a source pixel's bilinear value is a convex
    combination of the logits at the 2×2 model-grid samples around it, so where one class wins
    at all four (first index on ties, as argmax) it wins at every pixel between them. Such
    pixels take that class directly (a repeat of the per-cell label); only pixels of cells whose
    four winners differ (the class boundaries, a few % of the box) are interpolated, from the
    same weights. Same labels as :func:`to_source_grid` + argmax up to float rounding at exact
    ties; ~2× faster on a 120-slice series.
    """
    n, _, size, _ = logits.shape
    if out is None:
        out = np.zeros((n, rows, cols), np.uint8)
    else:
        out[...] = 0
    r0, r1, c0, c1 = box.clipped(rows, cols)
    if r1 <= r0 or c1 <= c0:
        return out
    in_rows, in_cols = box.inside(rows, cols)
    row_taps = _bilinear_taps(size, box.side, in_rows.start, in_rows.stop)
    col_taps = _bilinear_taps(size, box.side, in_cols.start, in_cols.stop)
    for a in range(0, n, step):
        part = logits[a:a + step].float()
        winner = argmax_channels(part.contiguous(memory_format=torch.channels_last)).numpy()
        # The four corner winners of every cell used by the output (cells: rows × cols).
        top, bottom = winner[:, row_taps.cell_lo], winner[:, row_taps.cell_hi]
        corners = [top[:, :, col_taps.cell_lo], top[:, :, col_taps.cell_hi],
                   bottom[:, :, col_taps.cell_lo], bottom[:, :, col_taps.cell_hi]]
        mixed = (corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3])
        cell_label = np.where(mixed, _MIXED, corners[0])
        full = np.repeat(np.repeat(cell_label, row_taps.count, axis=1), col_taps.count, axis=2)
        s, r, c = np.nonzero(full == _MIXED)
        if s.size:
            full[s, r, c] = _interpolated_argmax(part, s, row_taps, r, col_taps, c)
        out[a:a + step, r0:r1, c0:c1] = full
    return out


#: Cell marker of :func:`logits_to_labels` (not a class index: at most 255 classes).
_MIXED = np.uint8(255)


@dataclass(frozen=True)
class _BilinearTaps:
    """Where output pixels ``lo..hi-1`` of a ``size → side`` bilinear resize sample the input
    (``align_corners=False``, as ``F.interpolate``): per pixel the two input indices and the
    weight of the second; per distinct left index (a "cell", in output order) its two indices
    and how many consecutive output pixels fall in it."""

    lo: np.ndarray
    hi: np.ndarray
    weight: np.ndarray
    cell_lo: np.ndarray
    cell_hi: np.ndarray
    count: np.ndarray


def _bilinear_taps(size: int, side: int, lo: int, hi: int) -> _BilinearTaps:
    # float32 arithmetic as ATen's upsample_bilinear2d: scale = in/out, src = scale·(dst+½)−½ ≥ 0.
    scale = np.float32(size) / np.float32(side)
    src = np.maximum(scale * (np.arange(lo, hi, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    first = np.minimum(src.astype(np.int64), size - 1)
    second = np.where(first < size - 1, first + 1, first)
    cells, count = np.unique(first, return_counts=True)  # ``first`` is non-decreasing
    return _BilinearTaps(first, second, (src - first).astype(np.float32), cells,
                         np.where(cells < size - 1, cells + 1, cells), count)


def _interpolated_argmax(logits: torch.Tensor, s: np.ndarray, rows: _BilinearTaps, r: np.ndarray,
                         cols: _BilinearTaps, c: np.ndarray) -> np.ndarray:
    """Argmax over classes of the bilinear logits at the pixels ``(s, r, c)`` (slice in
    ``logits``, row and column within the taps' range)."""
    x = np.ascontiguousarray(logits.permute(0, 2, 3, 1).numpy())  # (n, size, size, C)
    y0, y1, wy = rows.lo[r], rows.hi[r], rows.weight[r][:, None]
    x0, x1, wx = cols.lo[c], cols.hi[c], cols.weight[c][:, None]
    upper = x[s, y0, x0] * (1 - wx) + x[s, y0, x1] * wx
    lower = x[s, y1, x0] * (1 - wx) + x[s, y1, x1] * wx
    return (upper * (1 - wy) + lower * wy).argmax(1).astype(np.uint8)


def argmax_channels(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1)`` as ``uint8`` (first index on ties), by a pairwise tournament over the class
    planes: 2× faster than ``argmax`` on CPU for a few classes in channels-last layout."""
    vals = list(x.unbind(1))
    idx = [torch.tensor(k, dtype=torch.uint8) for k in range(len(vals))]
    while len(vals) > 1:
        next_vals, next_idx = [], []
        for j in range(0, len(vals) - 1, 2):
            right = vals[j + 1] > vals[j]
            next_vals.append(torch.maximum(vals[j], vals[j + 1]))
            next_idx.append(torch.where(right, idx[j + 1], idx[j]))
        if len(vals) % 2:
            next_vals.append(vals[-1])
            next_idx.append(idx[-1])
        vals, idx = next_vals, next_idx
    return idx[0].expand(x.shape[:1] + x.shape[2:])


def labels_to_model_grid(labels: np.ndarray, box: CropBox, size: int, num_classes: int,
                         chunk: int = 16) -> torch.Tensor:
    """Ground-truth labels ``(n, rows, cols)`` → int64 ``(n, size, size)`` on the model grid.

    Each class's indicator is resized like the image (antialiased bilinear) and the class with the
    largest share wins, so small structures survive better than with nearest-neighbour.
    """
    labels = np.asarray(labels)
    out = torch.empty((labels.shape[0], size, size), dtype=torch.int64)
    classes = torch.arange(num_classes, dtype=torch.uint8).view(1, num_classes, 1, 1)
    for a in range(0, labels.shape[0], chunk):
        lab = _crop_square(torch.from_numpy(np.ascontiguousarray(labels[a:a + chunk])), box, 0)
        onehot = (lab[:, None] == classes).float()
        if box.side != size:
            onehot = F.interpolate(onehot, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=box.side > size)
        out[a:a + chunk] = onehot.argmax(1)
    return out


def window_indices(num_slices: int, target: int, context: int) -> np.ndarray:
    """Slice indices of the window of ``target`` (``context`` each side), edge-replicated.

    The paper (section 2.5) gives the ConvLSTM 5 slices above and below the target; at the ends
    of the series the missing neighbours are copies of the first/last slice.
    """
    return np.clip(np.arange(target - context, target + context + 1), 0, num_slices - 1)


def pad_context(stack: torch.Tensor, context: int) -> torch.Tensor:
    """Replicate the first/last slice ``context`` times along dim 0 (edge policy above)."""
    if context == 0:
        return stack
    first = stack[:1].expand(context, *stack.shape[1:])
    last = stack[-1:].expand(context, *stack.shape[1:])
    return torch.cat([first, stack, last], 0)
