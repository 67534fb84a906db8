"""Load one CT series into a :class:`CTVolume` in Hounsfield units (DICOM PS3.3 C.7.6.2, C.11.1).

Geometry comes from highdicom (as :func:`highdicom.get_volume_from_series`), which sorts the
instances along the slice normal (never by InstanceNumber) and builds the LPS affine; HU from
pydicom's modality LUT. Before
that, :func:`check_series` applies the rejection rules with a message naming the series and the
reason; nothing is resampled (tilted or non-uniform series are rejected, see README).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import get_series_volume_positions
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage

from lungburden.dicom_io.selection import CHEST_BODY_PART_REGEX

log = logging.getLogger(__name__)


class SeriesRejected(ValueError):
    """A series cannot be analysed; ``str(exc)`` names the series and the reason."""

    def __init__(self, series_uid: str, reason: str):
        self.series_uid = series_uid
        self.reason = reason
        super().__init__(f"series {series_uid} rejected: {reason}")


@dataclass(frozen=True)
class LoadLimits:
    """Tolerances of the rejection rules (configurable from YAML ``selection``)."""

    min_slices: int = 16
    #: Allowed relative deviation of a slice gap from the median gap.
    spacing_tolerance: float = 0.05
    #: Allowed angle (degrees) between the stacking direction and the slice normal (gantry tilt).
    max_tilt_degrees: float = 0.5
    #: BodyPartExamined values naming the chest, for the content check
    #: (:func:`lungburden.dicom_io.content.check_lungs`); the header never refuses a series alone.
    body_part_regex: str | None = CHEST_BODY_PART_REGEX


#: Size guard: larger Rows/Columns, frames or slices are refused before any pixel allocation.
MAX_IMAGE_DIMENSION = 4096
MAX_FRAMES = 4096
#: Voxels of one loaded volume (float32: 4 GiB).
MAX_VOXELS = 2**30


def check_size(uid: str, rows: int, columns: int, slices: int) -> None:
    """Raise :class:`SeriesRejected` if the volume's size exceeds the guard's limits."""
    if not (0 < rows <= MAX_IMAGE_DIMENSION and 0 < columns <= MAX_IMAGE_DIMENSION and 0 < slices <= MAX_FRAMES
            and rows * columns * slices <= MAX_VOXELS):
        raise SeriesRejected(uid, f"image size {rows}x{columns}x{slices} beyond the limits "
                                  f"({MAX_IMAGE_DIMENSION}x{MAX_IMAGE_DIMENSION}x{MAX_FRAMES}, {MAX_VOXELS} voxels)")


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series in Hounsfield units on its own voxel grid.

    ``hu`` is ``float32`` with axes ``(slice, row, column)``. Slice order is highdicom's: along
    the slice normal of a right-handed frame (for a supine axial chest CT the first slice is the
    most superior). ``affine`` maps ``(slice, row, column, 1)`` indices to LPS patient
    coordinates in mm. ``datasets`` are the source instances in the same slice order, with
    their pixel data removed (headers only), for the derivation references of SEG and SR.
    """

    hu: np.ndarray
    affine: np.ndarray
    datasets: tuple[Dataset, ...]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    source_files: tuple[Path, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (mm³ / 1000), from the true geometry."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def to_highdicom(self) -> hd.Volume:
        return hd.Volume(
            array=self.hu,
            affine=self.affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=self.frame_of_reference_uid,
        )


def _series_uid(datasets: Sequence[Dataset]) -> str:
    return str(datasets[0].get("SeriesInstanceUID", "<no SeriesInstanceUID>")) if datasets else "<empty>"


def check_series(datasets: Sequence[Dataset], limits: LoadLimits = LoadLimits()) -> None:
    """Raise :class:`SeriesRejected` if ``datasets`` is not one analysable axial CT stack.

    Works on headers only (``stop_before_pixels`` datasets are fine, except for the pixel data
    check, which :func:`load_volume` repeats on full datasets).
    """
    uid = _series_uid(datasets)
    if not datasets:
        raise SeriesRejected(uid, "no instances")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if "" in series_uids:
        raise SeriesRejected(uid, "an instance lacks SeriesInstanceUID")
    if len(series_uids) > 1:
        raise SeriesRejected(uid, f"instances of {len(series_uids)} different series (SeriesInstanceUID)")
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if "" in frames:
        raise SeriesRejected(uid, "an instance lacks FrameOfReferenceUID (the SEG is placed on the images by it)")
    if len(frames) > 1:
        raise SeriesRejected(uid, f"instances in {len(frames)} different frames of reference")
    for ds in datasets:
        sop_class = ds.get("SOPClassUID", "")
        if ds.get("Modality") != "CT" or sop_class != CTImageStorage:
            raise SeriesRejected(
                uid,
                f"not a CT image series (Modality={ds.get('Modality', '?')}, "
                f"SOPClassUID={sop_class or '?'}); only CT Image Storage is analysed",
            )
    image_types = {tuple(str(v).upper() for v in ds.get("ImageType", [])) for ds in datasets}
    if any("LOCALIZER" in t for t in image_types):
        raise SeriesRejected(uid, "localizer/scout series (ImageType contains LOCALIZER)")
    for ds in datasets:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise SeriesRejected(uid, f"instance {ds.get('SOPInstanceUID', '?')} lacks {', '.join(missing)}")
    if len(datasets) < limits.min_slices:
        raise SeriesRejected(uid, f"{len(datasets)} slices, fewer than the minimum of {limits.min_slices}")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise SeriesRejected(uid, f"mixed in-plane sizes {sorted(sizes)}")
    check_size(uid, *next(iter(sizes)), len(datasets))
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise SeriesRejected(uid, "mixed image orientations within the series")
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise SeriesRejected(uid, "mixed pixel spacings within the series")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    if abs(abs(normal[2]) - 1.0) > 0.1:
        raise SeriesRejected(uid, "not an axial series (slice normal is not head-feet)")
    tilt = float(datasets[0].get("GantryDetectorTilt", 0) or 0)
    if abs(tilt) > limits.max_tilt_degrees:
        raise SeriesRejected(uid, f"gantry tilt of {tilt} degrees; tilted series are not resampled")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    along = positions @ normal
    order = np.argsort(along)
    along_sorted = along[order]
    gaps = np.diff(along_sorted)
    if np.any(gaps < 1e-3):
        dup = int(np.sum(gaps < 1e-3))
        raise SeriesRejected(
            uid, f"{dup} duplicate slice positions (multi-phase or repeated acquisition in one series)"
        )
    median_gap = float(np.median(gaps))
    worst = float(np.max(np.abs(gaps - median_gap)))
    if worst > limits.spacing_tolerance * median_gap:
        raise SeriesRejected(
            uid,
            f"non-uniform slice spacing (median gap {median_gap:.3f} mm, a gap deviates by {worst:.3f} mm; "
            "missing slices?)",
        )
    # Gantry tilt also shows as stacking offsets perpendicular to the normal.
    steps = np.diff(positions[order], axis=0)
    cosines = np.clip((steps @ normal) / np.linalg.norm(steps, axis=1), -1.0, 1.0)
    angle = float(np.degrees(np.arccos(cosines.min())))
    if angle > limits.max_tilt_degrees:
        raise SeriesRejected(
            uid, f"slices are stacked {angle:.1f} degrees off the slice normal (gantry tilt); not resampled"
        )


#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def header_only(ds: Dataset) -> Dataset:
    """A new dataset with the elements of ``ds`` except the pixel data (``ds`` is left unchanged).

    Elements are taken as read (``Dataset.get_item``: still raw, each with its own encoding),
    so keeping the headers of a series converts no values (~1 ms per instance less).
    """
    header = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if tag not in _PIXEL_TAGS})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def load_volume(
    datasets: Sequence[Dataset],
    limits: LoadLimits = LoadLimits(),
    source_files: Sequence[Path] = (),
) -> CTVolume:
    """Build a :class:`CTVolume` from the full datasets of one series (any order).

    Pixel data are decoded by pydicom (compressed syntaxes through pylibjpeg) and mapped to HU
    by the modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, PS3.3 C.11.1;
    pydicom's ``apply_modality_lut``; a missing rescale reads as slope 1, intercept 0). Slice
    order, spacing and affine are highdicom's (:func:`_hu_stack`).
    """
    check_series(datasets, limits)
    uid = _series_uid(datasets)
    for ds in datasets:
        if "PixelData" not in ds:
            raise SeriesRejected(uid, f"instance {ds.get('SOPInstanceUID', '?')} has no Pixel Data")
    try:
        hu, affine, order = _hu_stack(datasets)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError,
            IndexError) as exc:  # what pydicom / highdicom raise on malformed pixel or LUT data
        raise SeriesRejected(uid, f"pixel data or geometry unreadable: {type(exc).__name__}: {exc}") from exc
    files = tuple(Path(source_files[i]) for i in order) if source_files else ()
    headers = [header_only(datasets[i]) for i in order]
    first = datasets[0]
    return CTVolume(
        hu=hu,
        affine=affine,
        datasets=tuple(headers),
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        source_files=files,
    )


#: Integers of at most this magnitude are exact in float32 (24-bit significand).
_FLOAT32_EXACT = 2**24


def _modality_lut_into(pixels: np.ndarray, ds: Dataset, out: np.ndarray) -> None:
    """Write the modality-LUT output of ``pixels`` (PS3.3 C.11.1) into the float32 ``out``.

    Equal to ``float32(apply_modality_lut(pixels, ds))`` (pydicom, float64). The usual CT case,
    integer pixels with an integer Rescale Slope and Intercept whose outputs stay below 2**24, is
    computed in float32 directly: every intermediate is an integer exact in float32, so the
    result is the same, without pydicom's float64 temporary (~0.5 ms per 512×512 slice).
    """
    if not ds.get("ModalityLUTSequence") and "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if (pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2 and slope.is_integer()
                and intercept.is_integer()
                and abs(slope) * 2 ** (8 * pixels.dtype.itemsize) + abs(intercept) < _FLOAT32_EXACT):
            if slope == 1.0:
                np.add(pixels, np.float32(intercept), out=out, dtype=np.float32)
            else:
                np.multiply(pixels, np.float32(slope), out=out, dtype=np.float32)
                out += np.float32(intercept)
            return
    out[...] = apply_modality_lut(pixels, ds)


def _hu_stack(datasets: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, affine, order)``: the float32 HU stack, its LPS affine and the permutation of
    ``datasets`` into slice order.

    The geometry is that of :func:`highdicom.get_volume_from_series` (its
    ``get_series_volume_positions`` ordering and ``Volume.from_attributes`` affine), the pixel
    transform only the modality LUT: highdicom's per-instance transform set-up (IOD checks,
    VOI / presentation / real-world LUT selection) took twice the time of decoding itself.
    Unlike highdicom's default, a Real World Value Map is not preferred over the modality LUT
    and MONOCHROME1 is not inverted: CT values are HU by the modality LUT (PS3.3 C.11.1).
    Series/frame-of-reference consistency is checked by :func:`check_series` first.
    """
    spacing, index = get_series_volume_positions(list(datasets))
    if spacing is None or index is None:
        raise ValueError("the instances do not form a regularly spaced volume")
    order = np.argsort(np.asarray(index))
    first = datasets[int(order[0])]
    check_size(_series_uid(datasets), int(first.Rows), int(first.Columns), len(datasets))
    hu = np.empty((len(datasets), int(first.Rows), int(first.Columns)), np.float32)
    for k, i in enumerate(order):
        ds = datasets[int(i)]
        _modality_lut_into(ds.pixel_array, ds, hu[k])
    volume = hd.Volume.from_attributes(
        array=hu, image_position=first.ImagePositionPatient, image_orientation=first.ImageOrientationPatient,
        pixel_spacing=first.PixelSpacing, spacing_between_slices=spacing, coordinate_system="PATIENT",
        frame_of_reference_uid=first.get("FrameOfReferenceUID"))
    return hu, np.asarray(volume.affine, dtype=np.float64), order


def load_files(paths: Sequence[Path], limits: LoadLimits = LoadLimits()) -> CTVolume:
    """Read the files of one series and load them (see :func:`load_volume`)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    return load_volume(datasets, limits, source_files=paths)
