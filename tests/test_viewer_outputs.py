"""Outputs for every viewer: SR location groups, Secondary Capture series, PDF report.

Synthetic series (tests/test_results.py) for speed; dciodvfy and dcmqi for validity; the node's
pipeline and delivery into a real Orthanc for the wiring.
"""

from __future__ import annotations

import json
import re

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_results import (
    ALGORITHM,
    KNOWN_WARNINGS,
    SR_FIELDS,
    _require_tool,
    synthetic_datasets,
    synthetic_labels,
)

from lungburden.dicom_io.volume import load_volume
from lungburden.pipeline import AnalysisResult, encode_results, result_document, result_uids, write_outputs
from lungburden.quantify import quantify
from lungburden.results import codes
from lungburden.results.pdf import pdf_bytes_of
from lungburden.results.seg import write_dataset
from lungburden.results.validate import read_sr_with_dcmqi, run_dciodvfy, zone_values


def _conformant(path) -> None:
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    unknown = [w for w in report.warnings if not any(re.search(p, w) for p in KNOWN_WARNINGS)]
    assert unknown == [], report.output


@pytest.fixture(scope="module")
def analysis():
    volume = load_volume(synthetic_datasets())
    labels = synthetic_labels(volume)
    quantities = quantify(labels, volume.hu, volume.affine)
    return AnalysisResult(volume, labels, quantities, ALGORITHM, "threshold-test")


@pytest.fixture(scope="module")
def encoded(analysis):
    return encode_results(analysis, uid_seed="series/v1")


def test_sr_groups_have_image_coordinates(analysis, encoded):
    """Every tracked finding has a TID 1410 group with an SCOORD POINT on a source slice."""
    sr = encoded.sr
    groups = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ][0].ContentSequence

    def tracking_uid(group):
        return next(i.UID for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040")

    with_numbers = [g for g in groups if any(i.ValueType == "NUM" for i in g.ContentSequence)]
    located = {
        tracking_uid(g): g for g in groups if any(i.ValueType == "SCOORD" for i in g.ContentSequence)
    }
    assert len(with_numbers) == 5 and len(located) == 5  # lung, GGO, high opacity, burden, lung zones
    source_uids = [ds.SOPInstanceUID for ds in analysis.volume.datasets]
    for group in with_numbers:
        location = located[tracking_uid(group)]  # same Tracking UID: viewers merge the two
        scoord = next(i for i in location.ContentSequence if i.ValueType == "SCOORD")
        assert scoord.GraphicType == "POINT" and len(scoord.GraphicData) == 2
        image = scoord.ContentSequence[0]
        assert image.RelationshipType == "SELECTED FROM"
        k = source_uids.index(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        col, row = (int(v - 0.5) for v in scoord.GraphicData)
        finding = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071")
        code = finding.ConceptCodeSequence[0].CodeValue
        wanted = {
            codes.LUNG.value: analysis.labels > 0,
            codes.GROUND_GLASS_OPACITY.value: analysis.labels == 2,
            codes.CONSOLIDATION.value: analysis.labels == 3,
            codes.ABNORMAL_OPACITY.value: analysis.labels >= 2,
        }[code]
        assert wanted[k, row, col], code  # the point lies on the finding
        assert wanted[k].sum() == wanted.sum(axis=(1, 2)).max()  # in its largest slice
    report = hd.sr.MeasurementReport.from_sequence([sr])
    assert len(report.get_planar_roi_measurement_groups()) == 5
    assert len(report.get_volumetric_roi_measurement_groups()) == 3


@pytest.mark.integration
def test_sr_valid_and_dcmqi_numbers(analysis, encoded, tmp_path):
    _require_tool("dciodvfy")
    _require_tool("tid1500reader")
    path = write_dataset(encoded.sr, tmp_path / "sr.dcm")
    _conformant(path)
    values = read_sr_with_dcmqi(path, tmp_path / "dcmqi")
    q = analysis.quantities.to_dict()
    assert values == pytest.approx({**{k: q[k] for k in SR_FIELDS}, **zone_values(analysis.quantities.zones)})


@pytest.mark.integration
def test_secondary_captures_valid(analysis, encoded, tmp_path):
    _require_tool("dciodvfy")
    sc = encoded.sc
    assert 6 <= len(sc) <= 12
    uids = result_uids("series/v1")
    assert {str(ds.SeriesInstanceUID) for ds in sc} == {uids["sc_series"]}
    assert [str(ds.SOPInstanceUID) for ds in sc] == [uids[f"sc_sop_{n}"] for n in range(len(sc))]
    names = [str(ds.PatientName) for ds in analysis.volume.datasets[:1]]
    for n, ds in enumerate(sc):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.StudyInstanceUID == analysis.volume.study_instance_uid
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES"
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
        _conformant(write_dataset(ds, tmp_path / f"sc{n}.dcm"))
        assert names[0] not in json.dumps(ds.to_json_dict(), default=str).replace(str(ds.PatientName), "")
    axial = sc[0].pixel_array
    yellow = (axial[..., 0] > 200) & (axial[..., 1] > 150) & (axial[..., 2] < 120)
    red = (axial[..., 0] > 150) & (axial[..., 1] < 90) & (axial[..., 2] < 90)
    assert yellow.any() or red.any()  # the overlay is burned in


@pytest.mark.integration
def test_pdf_report_valid(analysis, encoded, tmp_path):
    _require_tool("dciodvfy")
    ds = encoded.pdf
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.StudyInstanceUID == analysis.volume.study_instance_uid
    assert ds.SeriesInstanceUID == result_uids("series/v1")["pdf_series"]
    data = pdf_bytes_of(ds)
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert data == encoded.pdf_bytes
    _conformant(write_dataset(ds, tmp_path / "report.dcm"))


def test_outputs_written_and_recorded(analysis, tmp_path):
    encoded = encode_results(analysis, uid_seed="series/v1", outputs=["seg", "sr", "pdf"])
    assert encoded.sc == [] and encoded.pdf is not None
    seg, sr = encoded
    document = result_document(analysis, seg, sr, {}, encoded=encoded)
    assert document["outputs"] == ["seg", "sr", "pdf"]
    assert document["pdf_sop_instance_uid"] == str(encoded.pdf.SOPInstanceUID)
    assert "sc_series_instance_uid" not in document
    write_outputs(seg, sr, document, tmp_path, encoded)
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")
    assert pydicom.dcmread(tmp_path / "report.dcm").SOPInstanceUID == encoded.pdf.SOPInstanceUID
    assert not (tmp_path / "sc").exists()
    with pytest.raises(ValueError):
        encode_results(analysis, outputs=["sr"])
    with pytest.raises(ValueError):
        encode_results(analysis, outputs=["seg", "movie"])


def test_result_files_follow_outputs(analysis, encoded, tmp_path):
    from types import SimpleNamespace

    from lungburden.jobs.exporters import result_files

    seg, sr = encoded
    write_outputs(seg, sr, result_document(analysis, seg, sr, {}, encoded=encoded), tmp_path, encoded)
    files = result_files(SimpleNamespace(id=1, result_dir=tmp_path))
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names[:2] == ["seg.dcm", "sr.dcm"]
    assert names[2:-1] == [f"sc/sc_{n:02d}.dcm" for n in range(1, len(encoded.sc) + 1)]
    assert names[-1] == "report.dcm"
