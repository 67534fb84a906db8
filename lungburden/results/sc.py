"""Secondary Capture images of the result (PS3.3 A.8.1 SC Image IOD), built by highdicom.

For viewers that show neither SEG nor SR: one new series in the source study with

* key axial slices in a lung window (W 1500 / L -600) with the lung outline (blue), ground-glass
  opacity (yellow) and high opacity (red) blended in, and a legend band with the numbers;
* one coronal view through the lungs with the same overlay;
* one summary image with the numbers, the model and "not for diagnostic use".

Images are RGB, 8 bits, Explicit VR Little Endian, Burned In Annotation YES. The burned-in text
holds no patient identification. :func:`render_axial` and friends return arrays so that the PDF
report uses the same pictures.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

import lungburden
from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume
from lungburden.quantify import Quantities
from lungburden.results.seg import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    algorithm_equipment,
    drop_incomplete_references,
)
from lungburden.results.trend_plot import render_trend, zone_lines
from lungburden.segmentation.base import AlgorithmInfo

#: Lung window (width, level) in HU.
LUNG_WINDOW = (1500.0, -600.0)
GGO_RGB = (255, 220, 0)
HIGH_OPACITY_RGB = (230, 30, 30)
OUTLINE_RGB = (60, 150, 255)
OVERLAY_ALPHA = 0.45
DISCLAIMER = "Automatic result - not a diagnosis - not for diagnostic use"

#: Copied from the source so that the SC files into the same patient and study.
_PATIENT_STUDY = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "referring_physician_name": "ReferringPhysicianName",
}


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def key_slices(labels: np.ndarray, count: int = 8) -> list[int]:
    """Slice indices a reader would look at first, in slice order.

    The slice of greatest opacity (GGO + high opacity) in each third of the lung field's extent,
    then evenly spaced slices through the lung field until ``count`` slices are chosen.
    """
    field = (labels > 0).any(axis=(1, 2))
    if not field.any():
        return [labels.shape[0] // 2]
    first, last = (int(i) for i in np.flatnonzero(field)[[0, -1]])
    opacity = ((labels == L.GGO) | (labels == L.HIGH_OPACITY)).sum(axis=(1, 2))
    chosen: list[int] = []
    bounds = np.linspace(first, last + 1, 4).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if stop > start and opacity[start:stop].max() > 0:
            chosen.append(start + int(np.argmax(opacity[start:stop])))
    extent = last - first + 1
    for k in np.linspace(first, last, min(count, extent) + 2)[1:-1].round().astype(int):
        if len(chosen) >= min(count, extent):
            break
        if int(k) not in chosen:
            chosen.append(int(k))
    return sorted(set(chosen))


def _window(hu: np.ndarray) -> np.ndarray:
    width, level = LUNG_WINDOW
    grey = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0) * 255.0
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 2-D slice in the lung window with GGO, high opacity and the lung outline, RGB uint8."""
    rgb = _window(hu.astype(np.float32))
    for label, colour in ((L.GGO, GGO_RGB), (L.HIGH_OPACITY, HIGH_OPACITY_RGB)):
        mask = labels == label
        rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.asarray(colour, np.float32)
    field = labels > 0
    outline = field & ~ndimage.binary_erosion(field)
    rgb[outline] = OUTLINE_RGB
    return rgb.round().astype(np.uint8)


def _legend_lines(q: Quantities) -> list[str]:
    return [
        f"Lung {q.lung_volume_ml:.0f} mL   GGO {q.ggo_volume_ml:.0f} mL ({q.ggo_percent:.1f} %)   "
        f"High opacity {q.high_opacity_volume_ml:.0f} mL ({q.high_opacity_percent:.1f} %)",
        f"Burden {q.burden_percent:.1f} % of the lung   {DISCLAIMER}",
    ]


def _with_band(image: np.ndarray, lines: Sequence[str], title: str) -> np.ndarray:
    """``image`` (enlarged to at least 512 columns) with a band of colour keys, ``title`` and ``lines``."""
    if image.shape[1] < 512:
        factor = -(-512 // image.shape[1])
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    width = image.shape[1]
    size = max(10, width // 48)
    band = int(size * 1.5 * (len(lines) + 2))
    canvas = Image.new("RGB", (width, image.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    y = image.shape[0] + size // 3
    x = size // 2
    for name, colour in (("Lung outline", OUTLINE_RGB), ("GGO", GGO_RGB), ("High opacity", HIGH_OPACITY_RGB)):
        draw.rectangle([x, y + 2, x + size, y + size], fill=colour)
        draw.text((x + int(size * 1.4), y), name, fill=(255, 255, 255), font=font)
        x += int(size * 1.4) + int(draw.textlength(name, font=font)) + size
    draw.text((x, y), title, fill=(200, 200, 200), font=font)
    for line in lines:
        y += int(size * 1.5)
        draw.text((size // 2, y), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def render_axial(volume: CTVolume, labels: np.ndarray, k: int, quantities: Quantities) -> np.ndarray:
    """Axial slice ``k`` with overlay and legend band (RGB uint8)."""
    image = overlay(volume.hu[k], labels[k])
    return _with_band(image, _legend_lines(quantities), f"Slice {k + 1}/{volume.shape[0]}")


def _coronal_row(labels: np.ndarray) -> int:
    rows = np.flatnonzero((labels > 0).any(axis=(0, 2)))
    return int(rows[len(rows) // 2]) if rows.size else labels.shape[1] // 2


def render_coronal(volume: CTVolume, labels: np.ndarray, quantities: Quantities) -> np.ndarray:
    """Coronal view (slice axis vertical) through the middle of the lungs, true aspect ratio."""
    row = _coronal_row(labels)
    image = overlay(volume.hu[:, row, :], labels[:, row, :])
    slice_mm, _, col_mm = volume.spacing
    width = image.shape[1]
    height = max(1, round(image.shape[0] * slice_mm / col_mm))
    scale = 512 / max(width, height) if max(width, height) < 512 else 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))
    return _with_band(resized, _legend_lines(quantities), "Coronal")


def render_summary(
    quantities: Quantities,
    algorithm: AlgorithmInfo,
    size: int = 512,
    trend: Sequence[tuple[int, float]] | None = None,
) -> np.ndarray:
    """A text image with the numbers, the lung zones, the model and the disclaimer (no patient
    data); with ``trend`` ((days, burden %) oldest first, the current study last) a burden trend
    plot below. ``size`` columns; taller than ``size`` when zones or a trend are shown."""
    q = quantities
    canvas = Image.new("RGB", (size, 2 * size), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(size // 20), _font(size // 32)

    def hu(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} HU"

    rows = [
        ("Lung field", f"{q.lung_volume_ml:.0f} mL", "100 %", hu(q.lung_mean_hu)),
        ("  left", f"{q.left_lung_volume_ml:.0f} mL", "", ""),
        ("  right", f"{q.right_lung_volume_ml:.0f} mL", "", ""),
        ("GGO", f"{q.ggo_volume_ml:.0f} mL", f"{q.ggo_percent:.1f} %", hu(q.ggo_mean_hu)),
        ("High opacity", f"{q.high_opacity_volume_ml:.0f} mL", f"{q.high_opacity_percent:.1f} %",
         hu(q.high_opacity_mean_hu)),
        ("Burden", f"{q.opacity_volume_ml:.0f} mL", f"{q.burden_percent:.1f} %", ""),
    ]
    y = size // 24
    draw.text((size // 24, y), "Pneumonia burden (lungburden)", fill=(255, 255, 255), font=big)
    y += size // 10
    columns = [size // 24, size * 9 // 24, size * 14 // 24, size * 19 // 24]
    for x, text in zip(columns, ("", "Volume", "% lung", "Mean"), strict=True):
        draw.text((x, y), text, fill=(170, 170, 170), font=small)
    for name, *values in rows:
        y += size // 18
        colour = {"GGO": GGO_RGB, "High opacity": HIGH_OPACITY_RGB}.get(name, (255, 255, 255))
        for x, text in zip(columns, (name, *values), strict=True):
            draw.text((x, y), text, fill=colour, font=small)
    if q.zones is not None:
        y += size // 14
        draw.text((size // 24, y), "Involvement by lung zone (score 0-5)", fill=(170, 170, 170), font=small)
        for line in zone_lines(q.zones):
            y += size // 22
            draw.text((size // 24, y), line, fill=(255, 255, 255), font=small)
    y += size // 10
    for line in (
        f"Model: {algorithm.name} {algorithm.version}",
        f"Weights: {algorithm.weights_file or '-'} {(algorithm.weights_sha256 or '')[:12]}",
        f"Software: lungburden {lungburden.__version__}",
        "GGO + high opacity (consolidation, effusion) in % of the lung field.",
        DISCLAIMER,
    ):
        draw.text((size // 24, y), line, fill=(255, 255, 255), font=small)
        y += size // 22
    if trend:
        y += size // 48
        draw.text((size // 24, y), "Burden over time (% of the lung)", fill=(170, 170, 170), font=small)
        y += size // 22
        plot = render_trend(trend, width=size - size // 12, height=size // 3)
        canvas.paste(Image.fromarray(plot), (size // 24, y))
        y += plot.shape[0]
    height = max(size, y + size // 48)
    return np.asarray(canvas)[: height + (height % 2)]


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if vector[axis] > 0 else negative


def _uid(uids: Sequence[str] | None, index: int) -> str:
    return uids[index] if uids is not None else hd.UID()


def build_secondary_captures(
    volume: CTVolume,
    labels: np.ndarray,
    quantities: Quantities,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    series_number: int = 9003,
    series_description: str = "Pneumonia burden key images (lungburden)",
    slice_count: int = 8,
    manufacturer: str = MANUFACTURER,
    institution_name: str | None = None,
    trend: Sequence[tuple[int, float]] | None = None,
) -> list[Dataset]:
    """The SC series: key axial slices (:func:`key_slices`), a coronal view and a summary
    (with the burden ``trend`` of :func:`render_summary` when there are priors).

    ``sop_instance_uids`` (one per image, at least ``slice_count + 2``) makes the instances
    deterministic; the series UID likewise through ``series_instance_uid``.
    """
    source = volume.datasets[0]
    series_uid = series_instance_uid or hd.UID()
    slices = key_slices(labels, slice_count)
    images: list[tuple[np.ndarray, tuple[str, str], Dataset | None, str]] = []
    axial = (_orientation_letter(volume.affine[:3, 2]), _orientation_letter(volume.affine[:3, 1]))
    for k in slices:
        images.append((render_axial(volume, labels, k, quantities), axial, volume.datasets[k], f"Axial {k + 1}"))
    coronal = (_orientation_letter(volume.affine[:3, 2]), _orientation_letter(volume.affine[:3, 0]))
    images.append((render_coronal(volume, labels, quantities), coronal, None, "Coronal"))
    images.append((render_summary(quantities, algorithm, trend=trend), axial, None, "Summary"))
    if sop_instance_uids is not None and len(sop_instance_uids) < len(images):
        raise ValueError(f"{len(images)} SOP Instance UIDs needed, {len(sop_instance_uids)} given")
    patient_study = {arg: source.get(keyword) or None for arg, keyword in _PATIENT_STUDY.items()}
    out = []
    for index, (pixels, orientation, reference, comment) in enumerate(images):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
            sc = hd.sc.SCImage(
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                study_instance_uid=volume.study_instance_uid,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=_uid(sop_instance_uids, index),
                instance_number=index + 1,
                manufacturer=manufacturer,
                patient_orientation=orientation,
                contributing_equipment=[algorithm_equipment(algorithm, manufacturer=manufacturer)],
                series_description=series_description,
                manufacturer_model_name=MANUFACTURER_MODEL_NAME,
                software_versions=[lungburden.__version__, algorithm.version],
                institution_name=institution_name,
                **patient_study,
            )
        # Chest: an unpaired body part, so Laterality (Type 2C, General Series) stays absent.
        sc.BodyPartExamined = "CHEST"
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "NO"
        sc.ImageComments = comment
        sc.DerivationDescription = "Lung window with automatic segmentation overlay"
        if reference is not None:
            item = Dataset()
            item.ReferencedSOPClassUID = reference.SOPClassUID
            item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
            sc.SourceImageSequence = [item]
        drop_incomplete_references(sc)
        out.append(sc)
    return out


def max_instances(slice_count: int = 8) -> int:
    """Number of SC instances :func:`build_secondary_captures` makes at most for ``slice_count``."""
    return slice_count + 2
