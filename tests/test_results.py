"""DICOM SEG + TID 1500 SR encoding (lungburden.results): structure, dciodvfy, dcmqi round trips.

A tiny synthetic series built in memory checks the encoders quickly (two in-plane orientations,
an empty class); the real study (64 slices 512x512) is checked with dciodvfy and dcmqi.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ct_builders import ct_slice
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from lungburden import labels as L
from lungburden.dicom_io.volume import CTVolume, load_files, load_volume
from lungburden.quantify import Quantities, quantify
from lungburden.results import (
    SEGMENTS,
    build_measurement_report,
    build_segmentation,
    codes,
    segment_masks,
    write_dataset,
)
from lungburden.results.seg import algorithm_family, device_uid
from lungburden.results.validate import (
    ToolNotFound,
    find_tool,
    parse_dciodvfy,
    read_seg_with_dcmqi,
    read_sr_with_dcmqi,
    run_dciodvfy,
    zone_values,
)
from lungburden.segmentation.base import AlgorithmInfo

ALGORITHM = AlgorithmInfo(name="threshold-test", version="9.8.7", parameters={"lung_hu": "-400"})

#: dciodvfy warnings documented in docs/conformance.md; any other warning fails the tests.
KNOWN_WARNINGS = [
    r"Missing attribute or value that would be needed to build DICOMDIR - Study ID",
    r"Retired Person Name form",
    r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID",
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
]

#: Quantities fields the SR carries (the aerated-parenchyma mean HU has no segment; see sr.py).
SR_FIELDS = [f for f in Quantities.__dataclass_fields__ if f not in ("lung_mean_hu", "zones")]


def _require_tool(name: str) -> None:
    try:
        find_tool(name)
    except ToolNotFound:
        pytest.fail(f"{name} not installed (make test installs it)")


def _assert_conformant(path: Path) -> None:
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    unknown = [w for w in report.warnings if not any(re.search(p, w) for p in KNOWN_WARNINGS)]
    assert unknown == [], report.output


# --------------------------------------------------------------------------- synthetic series


def synthetic_datasets(
    n_slices: int = 20,
    size: int = 64,
    *,
    row_cosines: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0),
    reverse_files: bool = False,
) -> list[Dataset]:
    """A small axial CT series (one pydicom Dataset per slice, with pixel data) built in memory.

    HU: air -1000 outside a body disc of -50 HU that holds two -850 HU lungs. It also carries
    the non-conformant Referenced Study Sequence item (no Referenced SOP Class UID) of the real data.
    """
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    left = (yy - size / 2) ** 2 / 0.3 + (xx - 0.32 * size) ** 2 < (0.12 * size) ** 2 / 0.3
    right = (yy - size / 2) ** 2 / 0.3 + (xx - 0.68 * size) ** 2 < (0.12 * size) ** 2 / 0.3
    hu = np.full((size, size), -1000, np.int16)
    hu[body] = -50
    hu[left | right] = -850
    normal = np.cross(row_cosines, col_cosines)
    datasets = []
    for k in range(n_slices):
        incomplete = Dataset()
        incomplete.ReferencedSOPInstanceUID = generate_uid()
        datasets.append(ct_slice(
            hu, study_uid=study, series_uid=series, frame_uid=frame, index=k,
            position=np.array([-40.0, -40.0, 100.0]) + normal * 2.5 * k,
            orientation=(*row_cosines, *col_cosines), spacing=(1.25, 1.25), thickness=2.5,
            SpecificCharacterSet="ISO_IR 100", Manufacturer="Synthetic", PatientName="Test^Synthetic",
            PatientID="SYN-1", StudyID="S1", AccessionNumber="A1", SeriesNumber=3,
            ReferencedStudySequence=[incomplete]))
    return datasets[::-1] if reverse_files else datasets


def synthetic_labels(volume: CTVolume, *, with_high_opacity: bool = True) -> np.ndarray:
    labels = np.zeros(volume.shape, np.uint8)
    labels[volume.hu < -400] = L.LUNG
    labels[:, [0, -1], :] = 0  # air around the body is not lung
    outside = ~ndimage.binary_fill_holes(volume.hu > -500, structure=np.ones((1, 3, 3), bool))
    labels[outside] = L.BACKGROUND
    lung = labels == L.LUNG
    ggo = np.zeros_like(lung)
    ggo[4:9] = True
    labels[ggo & lung] = L.GGO
    if with_high_opacity:
        high = np.zeros_like(lung)
        high[12:15, :, : volume.shape[2] // 2] = True
        labels[high & lung] = L.HIGH_OPACITY
    return labels


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), False), id="standard"),
        pytest.param(((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), True), id="flipped-rows-reversed-files"),
    ],
)
def synthetic(request):
    row, col, reverse = request.param
    volume = load_volume(synthetic_datasets(row_cosines=row, col_cosines=col, reverse_files=reverse))
    labels = synthetic_labels(volume)
    seg = build_segmentation(volume, labels, ALGORITHM)
    quantities = quantify(labels, volume.hu, volume.affine)
    sr = build_measurement_report(volume, seg, quantities, ALGORITHM)
    return SimpleNamespace(volume=volume, labels=labels, seg=seg, sr=sr, quantities=quantities)


def test_synthetic_seg_frames_and_references(synthetic):
    v, seg = synthetic.volume, synthetic.seg
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert int(seg.NumberOfFrames) == v.shape[0] * len(SEGMENTS)
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(v.datasets)}
    seen = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPClassUID == CTImageStorage
        k = slice_of[source.ReferencedSOPInstanceUID]
        ipp = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(x) for x in ipp], [float(x) for x in v.datasets[k].ImagePositionPatient])
        seen.add((segment, k))
    assert len(seen) == v.shape[0] * len(SEGMENTS)


def test_synthetic_seg_descriptions(synthetic):
    seg = synthetic.seg
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(items) == [1, 2, 3]
    assert items[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert items[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert items[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "112120"
    assert items[3].SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    for number in (2, 3):
        assert items[number].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert items[number].AnatomicRegionSequence[0].CodeValue == "39607008"
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in items.values()}
    assert len(colours) == 3
    for item in items.values():
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == ALGORITHM.name and algo.AlgorithmVersion == ALGORITHM.version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert item.TrackingID and item.TrackingUID
    # Deterministic tracking UIDs: a rebuild tracks the same findings.
    again = build_segmentation(synthetic.volume, synthetic.labels, ALGORITHM)
    assert [s.TrackingUID for s in again.SegmentSequence] == [s.TrackingUID for s in seg.SegmentSequence]
    assert again.SOPInstanceUID != seg.SOPInstanceUID


def test_synthetic_patient_study_series_and_cleaning(synthetic):
    v, seg, sr = synthetic.volume, synthetic.seg, synthetic.sr
    assert "ReferencedStudySequence" in v.datasets[0]
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == v.study_instance_uid
        assert ds.PatientID == v.datasets[0].PatientID
        assert ds.SeriesInstanceUID != v.series_instance_uid
        assert "ReferencedStudySequence" not in ds
        equipment = [e for e in ds.ContributingEquipmentSequence if e.get("DeviceUID") == device_uid(ALGORITHM)]
        assert len(equipment) == 1
        assert equipment[0].ManufacturerModelName == ALGORITHM.name
        assert equipment[0].SoftwareVersions == ALGORITHM.version
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == v.frame_of_reference_uid


def test_synthetic_seg_pixels_roundtrip_with_highdicom(synthetic, tmp_path):
    v = synthetic.volume
    path = write_dataset(synthetic.seg, tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in v.datasets],
        segment_numbers=[1, 2, 3],
    )
    expected = segment_masks(synthetic.labels)
    for index, number in enumerate((1, 2, 3)):
        assert np.array_equal(pixels[..., index].astype(bool), expected[number])


def test_synthetic_sr_content(synthetic):
    sr, seg, q = synthetic.sr, synthetic.seg, synthetic.quantities
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {ds.SOPInstanceUID for ds in synthetic.volume.datasets} <= evidence

    content = {i.ConceptNameCodeSequence[0].CodeValue: i for i in sr.ContentSequence}
    assert content["121058"].ConceptCodeSequence[0].CodeValue == "169069000"  # Procedure reported
    assert content["121012"].UID == device_uid(ALGORITHM)  # Device Observer UID

    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    assert len(report.get_image_measurement_groups()) == 2  # burden and lung zones (TID 1501)
    tracking = {str(s.TrackingUID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    for group in groups:
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.referenced_segment.referenced_segment_numbers == [tracking[group.tracking_uid]]
        assert [site.value.value for site in group.finding_sites] == [codes.LUNG.value]
    # Laterality of the left/right lung volumes (dcmqi does not report per-measurement sites).
    lung = next(g for g in groups if g.finding_type.value == codes.LUNG.value)
    volumes = lung.get_measurements(name=codes.VOLUME)
    assert [m.value for m in volumes] == pytest.approx(
        [q.lung_volume_ml, q.left_lung_volume_ml, q.right_lung_volume_ml]
    )
    lateralities = [[s.laterality.value for s in m.finding_sites if s.laterality] for m in volumes]
    assert lateralities == [[], [codes.LEFT.value], [codes.RIGHT.value]]
    ggo = next(g for g in groups if g.finding_type.value == codes.GROUND_GLASS_OPACITY.value)
    (mean,) = ggo.get_measurements(name=codes.ATTENUATION_COEFFICIENT)
    assert mean.value == pytest.approx(q.ggo_mean_hu)
    assert mean.derivation.value == codes.MEAN.value
    assert mean.unit.value == "[hnsf'U]"
    (ratio,) = ggo.get_measurements(name=codes.VOLUME_RATIO)
    assert ratio.value == pytest.approx(q.ggo_percent) and ratio.unit.value == "%"


def test_empty_class_has_frames_and_no_mean(tmp_path):
    volume = load_volume(synthetic_datasets(n_slices=16, size=32))
    labels = synthetic_labels(volume, with_high_opacity=False)
    q = quantify(labels, volume.hu, volume.affine)
    assert q.high_opacity_mean_hu is None
    seg = build_segmentation(volume, labels, ALGORITHM)
    assert int(seg.NumberOfFrames) == 16 * 3
    sr = build_measurement_report(volume, seg, q, ALGORITHM)
    groups = hd.sr.MeasurementReport.from_sequence([sr]).get_volumetric_roi_measurement_groups()
    high = next(g for g in groups if g.finding_type.value == codes.CONSOLIDATION.value)
    assert high.get_measurements(name=codes.ATTENUATION_COEFFICIENT) == []
    assert [m.value for m in high.get_measurements(name=codes.VOLUME)] == [0.0]


def test_algorithm_family_lookup():
    assert algorithm_family(ALGORITHM).value == "123110"
    assert algorithm_family(AlgorithmInfo("x", "1", family="Histogram Analysis")).meaning == "Histogram Analysis"
    assert algorithm_family(AlgorithmInfo("x", "1", family="unknown family")).value == "123110"


def test_parse_dciodvfy():
    report = parse_dciodvfy("Segmentation\nError - Missing attribute\nWarning - dubious\nE: new style\n")
    assert report.errors == ["Error - Missing attribute", "E: new style"]
    assert report.warnings == ["Warning - dubious"]
    assert not report.ok


@pytest.mark.integration
def test_synthetic_tools_roundtrip(synthetic, tmp_path):
    _require_tool("dciodvfy")
    _require_tool("segimage2itkimage")
    seg_path = write_dataset(synthetic.seg, tmp_path / "seg.dcm")
    sr_path = write_dataset(synthetic.sr, tmp_path / "sr.dcm")
    _assert_conformant(seg_path)
    _assert_conformant(sr_path)
    expected = segment_masks(synthetic.labels)
    for reference in (synthetic.volume.affine, None):
        masks = read_seg_with_dcmqi(seg_path, tmp_path / f"dcmqi-{reference is None}", reference_affine=reference)
        assert sorted(masks) == [1, 2, 3]
        for number, mask in expected.items():
            assert np.array_equal(masks[number], mask), number
    values = read_sr_with_dcmqi(sr_path, tmp_path / "sr")
    q = synthetic.quantities.to_dict()
    assert values == pytest.approx({**{k: q[k] for k in SR_FIELDS}, **zone_values(synthetic.quantities.zones)})


# --------------------------------------------------------------------------- real study


def real_labels(volume: CTVolume) -> np.ndarray:
    """Lung = HU < -400 inside the body (per-slice hole filling), plus GGO/high-opacity blobs."""
    body = np.zeros(volume.shape, bool)
    for k in range(volume.shape[0]):
        body[k] = ndimage.binary_fill_holes(ndimage.binary_opening(volume.hu[k] > -500, iterations=2))
    lung = body & (volume.hu < -400)
    labels = np.where(lung, L.LUNG, L.BACKGROUND).astype(np.uint8)
    kk, rr, cc = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    centres = np.argwhere(lung)
    rng = np.random.default_rng(0)
    for label, radius in ((L.GGO, 20), (L.GGO, 14), (L.HIGH_OPACITY, 12)):
        k, r, c = centres[rng.integers(len(centres))]
        blob = ((kk - k) * 5.0) ** 2 + ((rr - r) * 0.84) ** 2 + ((cc - c) * 0.84) ** 2 < radius**2
        labels[blob & lung] = label
    return labels


@pytest.fixture(scope="module")
def real(real_lung_series, tmp_path_factory):
    volume = load_files(real_lung_series)
    labels = real_labels(volume)
    started = time.perf_counter()
    seg = build_segmentation(volume, labels, ALGORITHM)
    seg_seconds = time.perf_counter() - started
    quantities = quantify(labels, volume.hu, volume.affine)
    started = time.perf_counter()
    sr = build_measurement_report(volume, seg, quantities, ALGORITHM)
    sr_seconds = time.perf_counter() - started
    out = tmp_path_factory.mktemp("real-results")
    return SimpleNamespace(
        volume=volume,
        labels=labels,
        seg=seg,
        sr=sr,
        quantities=quantities,
        seg_path=write_dataset(seg, out / "seg.dcm"),
        sr_path=write_dataset(sr, out / "sr.dcm"),
        out=out,
        seconds=(seg_seconds, sr_seconds),
    )


def test_real_source_carries_the_incomplete_reference(real):
    item = real.volume.datasets[0].ReferencedStudySequence[0]
    assert "ReferencedSOPClassUID" not in item  # the defect the encoders must not copy
    for path in (real.seg_path, real.sr_path):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "ReferencedStudySequence" not in ds
        assert ds.StudyInstanceUID == real.volume.study_instance_uid
        assert ds.SeriesInstanceUID != real.volume.series_instance_uid
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_real_seg_frames_reference_their_source_slices(real):
    ds = pydicom.dcmread(real.seg_path, stop_before_pixels=True)
    n = real.volume.shape[0]
    assert int(ds.NumberOfFrames) == n * 3
    uids = [d.SOPInstanceUID for d in real.volume.datasets]
    per_segment: dict[int, list[str]] = {1: [], 2: [], 3: []}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        per_segment[number].append(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    for refs in per_segment.values():
        assert sorted(refs) == sorted(uids)


@pytest.mark.integration
def test_real_dciodvfy_zero_errors(real):
    _require_tool("dciodvfy")
    _assert_conformant(real.seg_path)
    _assert_conformant(real.sr_path)


@pytest.mark.integration
def test_real_dcmqi_masks_equal_labels(real):
    _require_tool("segimage2itkimage")
    masks = read_seg_with_dcmqi(real.seg_path, real.out / "dcmqi-seg", reference_affine=real.volume.affine)
    expected = segment_masks(real.labels)
    assert expected[2].any() and expected[3].any()
    for number, mask in expected.items():
        assert masks[number].shape == real.volume.shape
        assert np.array_equal(masks[number], mask), number


@pytest.mark.integration
def test_real_dcmqi_sr_numbers_equal_quantify(real):
    _require_tool("tid1500reader")
    values = read_sr_with_dcmqi(real.sr_path, real.out / "dcmqi-sr")
    q = real.quantities.to_dict()
    expected = {**{k: q[k] for k in SR_FIELDS}, **zone_values(real.quantities.zones)}
    assert set(values) == set(expected)
    assert values == pytest.approx(expected, rel=1e-12)


def test_real_build_time(real):
    seg_seconds, sr_seconds = real.seconds
    assert seg_seconds < 30 and sr_seconds < 30
