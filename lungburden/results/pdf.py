"""One-page PDF report (fpdf2) and its Encapsulated PDF DICOM instance (PS3.3 A.45.1).

The page holds the table of values, key images with the overlay (:mod:`lungburden.results.sc`),
the model and weights identification and the research-use disclaimer; no patient identification
is printed. The DICOM instance is a new series (Modality DOC) in the source study.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from fpdf import FPDF
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import lungburden
from lungburden.dicom_io.volume import CTVolume
from lungburden.quantify import Quantities
from lungburden.results.sc import DISCLAIMER, key_slices, overlay
from lungburden.results.seg import MANUFACTURER, MANUFACTURER_MODEL_NAME, algorithm_equipment
from lungburden.results.trend_plot import render_trend
from lungburden.segmentation.base import AlgorithmInfo

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
DOCUMENT_TITLE = "Pneumonia burden report (lungburden)"
LIMITS = (
    "Automatic segmentation of chest CT for research use. Not a medical device and not a diagnosis: "
    "a radiologist must review the images. Results are unreliable for non-chest series, "
    "contrast-enhanced or very noisy scans, and lungs with findings other than pneumonia."
)

#: Patient and General Study attributes copied from the source (Type 2 unless noted).
_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
#: Type 3 attributes copied when the source has them.
_COPIED_OPTIONAL = ("IssuerOfPatientID", "StudyDescription")


def _png(pixels: np.ndarray) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def _opacity_slices(labels: np.ndarray, count: int) -> list[int]:
    """The ``count`` key slices with the most opacity, in slice order."""
    slices = key_slices(labels, 8)
    opacity = (labels >= 2).sum(axis=(1, 2))
    return sorted(sorted(slices, key=lambda k: -int(opacity[k]))[:count])


def render_pdf(
    volume: CTVolume,
    labels: np.ndarray,
    quantities: Quantities,
    algorithm: AlgorithmInfo,
    *,
    created: datetime | None = None,
    image_count: int = 3,
    trend: Sequence[tuple[int, float]] | None = None,
) -> bytes:
    """The one-page A4 report as PDF bytes (deterministic for the same inputs and ``created``).

    Below the table of values: the involvement per lung zone and, with ``trend`` ((days, burden %)
    oldest first, the current study last), a small plot of the burden over time.
    """
    q = quantities
    created = created or datetime.now()
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_creation_date(created)
    pdf.set_title(DOCUMENT_TITLE)
    pdf.set_creator(f"lungburden {lungburden.__version__}")
    pdf.set_auto_page_break(False)
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    pdf.cell(0, 9, "Pneumonia burden - automatic CT quantification", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", "", 9)
    pdf.cell(0, 5, f"Series {volume.series_instance_uid}", new_x="LMARGIN", new_y="NEXT")
    pdf.cell(0, 5, f"Created {created.isoformat(timespec='seconds')}", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("helvetica", "B", 26)
    pdf.cell(0, 12, f"Burden {q.burden_percent:.1f} % of the lung", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    def hu(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    rows = [
        ("Finding", "Volume (mL)", "% of lung", "Mean HU"),
        ("Lung field", f"{q.lung_volume_ml:.1f}", "100", hu(q.lung_mean_hu)),
        ("  left lung", f"{q.left_lung_volume_ml:.1f}", f"{100 * q.left_lung_volume_ml / q.lung_volume_ml:.1f}"
         if q.lung_volume_ml else "-", ""),
        ("  right lung", f"{q.right_lung_volume_ml:.1f}", f"{100 * q.right_lung_volume_ml / q.lung_volume_ml:.1f}"
         if q.lung_volume_ml else "-", ""),
        ("Ground-glass opacity", f"{q.ggo_volume_ml:.1f}", f"{q.ggo_percent:.1f}", hu(q.ggo_mean_hu)),
        ("High opacity (consolidation, effusion)", f"{q.high_opacity_volume_ml:.1f}",
         f"{q.high_opacity_percent:.1f}", hu(q.high_opacity_mean_hu)),
        ("Burden (GGO + high opacity)", f"{q.opacity_volume_ml:.1f}", f"{q.burden_percent:.1f}", ""),
    ]
    pdf.set_font("helvetica", "", 10)
    with pdf.table(col_widths=(80, 35, 35, 30), text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT")) as table:
        for values in rows:
            row = table.row()
            for value in values:
                row.cell(value)
    pdf.ln(3)
    _zones_and_trend(pdf, q, trend)
    pdf.ln(3)
    slices = _opacity_slices(labels, image_count) or [volume.shape[0] // 2]
    width = (pdf.epw - 4 * (len(slices) - 1)) / len(slices)
    y = pdf.get_y()
    for index, k in enumerate(slices):
        x = pdf.l_margin + index * (width + 4)
        pdf.image(_png(overlay(volume.hu[k], labels[k])), x=x, y=y, w=width)
        pdf.set_xy(x, y + width + 1)
        pdf.set_font("helvetica", "", 8)
        pdf.cell(width, 4, f"Slice {k + 1}/{volume.shape[0]}", align="C")
    pdf.set_xy(pdf.l_margin, y + width + 6)
    pdf.set_font("helvetica", "", 8)
    pdf.multi_cell(0, 4, "Lung window (W 1500, L -600). Blue: lung outline. Yellow: ground-glass opacity. "
                   "Red: high opacity.", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("helvetica", "", 9)
    weights = algorithm.weights_file or "-"
    if algorithm.weights_sha256:
        weights += f" (SHA-256 {algorithm.weights_sha256[:16]}...)"
    for line in (
        f"Model: {algorithm.name} {algorithm.version} ({algorithm.family})",
        f"Weights: {weights}",
        f"Software: lungburden {lungburden.__version__}",
    ):
        pdf.cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("helvetica", "B", 10)
    pdf.multi_cell(0, 5, DISCLAIMER + ".", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", "", 9)
    pdf.multi_cell(0, 4.5, LIMITS, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _zones_and_trend(pdf: FPDF, q: Quantities, trend: Sequence[tuple[int, float]] | None) -> None:
    """The lung-zone table (left) and the burden trend plot (right) in one band of the page."""
    if q.zones is None and not trend:
        return
    top = pdf.get_y()
    bottom = top
    if q.zones is not None:
        pdf.set_font("helvetica", "B", 9)
        pdf.cell(100, 5, "Involvement by lung zone (% of the zone; score 0-5)", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", "", 9)
        with pdf.table(width=100, col_widths=(30, 35, 35), text_align=("LEFT", "RIGHT", "RIGHT"),
                       line_height=4.5, align="LEFT") as table:
            for values in [("Zone", "Right lung", "Left lung")] + [
                (name, *(f"{z.involvement_percent:.1f} % ({z.score})"
                         for z in (q.zones.zone("right", name), q.zones.zone("left", name))))
                for name in ("upper", "middle", "lower")
            ]:
                row = table.row()
                for value in values:
                    row.cell(value)
        pdf.set_font("helvetica", "", 8)
        pdf.multi_cell(100, 4, f"Total zone score {q.zones.total_score}/30. Zones: equal-height thirds of each "
                       "lung along the patient axis, not anatomical lobes.", new_x="LMARGIN", new_y="NEXT")
        bottom = pdf.get_y()
    if trend:
        x = pdf.l_margin + 106
        pdf.set_xy(x, top)
        pdf.set_font("helvetica", "B", 9)
        pdf.cell(pdf.epw - 106, 5, "Burden over time (% of the lung)")
        pdf.image(_png(render_trend(trend, width=480, height=180)), x=x, y=top + 6, w=pdf.epw - 106)
        bottom = max(bottom, top + 6 + (pdf.epw - 106) * 180 / 480)
    pdf.set_xy(pdf.l_margin, bottom)


def build_encapsulated_pdf(
    volume: CTVolume,
    pdf_bytes: bytes,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 9004,
    series_description: str = DOCUMENT_TITLE,
    manufacturer: str = MANUFACTURER,
    created: datetime | None = None,
    institution_name: str | None = None,
) -> Dataset:
    """Encapsulated PDF Storage instance of ``pdf_bytes`` (new series, Modality DOC, same study)."""
    source = volume.datasets[0]
    created = created or datetime.now()
    sop_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_uid
    for keyword in _COPIED:
        setattr(ds, keyword, source.get(keyword))
    for keyword in _COPIED_OPTIONAL:
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))
    ds.StudyInstanceUID = volume.study_instance_uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = MANUFACTURER_MODEL_NAME
    ds.SoftwareVersions = [lungburden.__version__, algorithm.version]
    if institution_name:
        ds.InstitutionName = institution_name
    ds.ContributingEquipmentSequence = [algorithm_equipment(algorithm, manufacturer=manufacturer)]
    ds.ConversionType = "WSD"  # SC Equipment Module: workstation
    ds.InstanceNumber = 1
    ds.ContentDate = created.strftime("%Y%m%d")
    ds.ContentTime = created.strftime("%H%M%S")
    ds.AcquisitionDateTime = None
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.BurnedInAnnotation = "NO"  # the page holds no patient identification
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    concept = Dataset()  # LOINC 18748-4 "Diagnostic imaging study" report (CID 7000-style title)
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        "18748-4", "LN", "Diagnostic Imaging Report"
    )
    ds.ConceptNameCodeSequence = [concept]
    ds.SourceInstanceSequence = [_instance(source_ds) for source_ds in volume.datasets]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = pdf_bytes + (b"\0" if len(pdf_bytes) % 2 else b"")
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    return ds


def _instance(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def pdf_bytes_of(ds: Dataset) -> bytes:
    """The PDF of an Encapsulated PDF instance, without the padding byte."""
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.get("EncapsulatedDocumentLength", len(data)))
    return data[:length]


__all__: Sequence[str] = ("build_encapsulated_pdf", "pdf_bytes_of", "render_pdf")
